//! Where a sink's URL comes from, the same way for every sink: its environment
//! variable, else `url_file` (a mounted secret), else `url`; and reading such
//! files. Errors name the key and the file, never the content.

use std::path::{Path, PathBuf};

use super::{invalid, ConfigError};

/// Sets `url` from `env_var` or from the file `url_file` names (trimmed);
/// `url_key`/`file_key` name the two keys in errors.
pub(super) fn take_url(
    env: &impl Fn(&str) -> Option<String>,
    env_var: &str,
    (url_key, file_key): (&'static str, &'static str),
    url: &mut Option<String>,
    url_file: &mut Option<PathBuf>,
) -> Result<(), ConfigError> {
    if let Some(v) = env(env_var).filter(|v| !v.trim().is_empty()) {
        *url = Some(v.trim().to_string());
        *url_file = None;
    } else if let Some(file) = url_file {
        if url.is_some() {
            return Err(ConfigError::Conflict {
                message: format!("{url_key} and {file_key} are both set; remove one"),
            });
        }
        *url = Some(read_file(file_key, file)?.trim().to_string());
    }
    Ok(())
}

/// A file a setting names (a secret, a certificate): its text, not empty.
pub(super) fn read_file(key: &'static str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        invalid(
            key,
            format!("cannot read {path:?}: {e}; check the path and its permissions"),
        )
    })?;
    if text.trim().is_empty() {
        return Err(invalid(key, format!("{path:?} is empty")));
    }
    Ok(text)
}
