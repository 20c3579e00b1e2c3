//! Unit tests of `transport`: sslmode and sslrootcert semantics, refusal hints.
use super::*;

fn tls(url_params: &str) -> Result<Tls, String> {
    PgTarget::parse(&format!("postgresql://u:s3cret@h/db?{url_params}")).map(|t| t.tls)
}

#[test]
fn sslmode_defaults_to_prefer_and_require_with_a_root_verifies_the_chain() {
    assert_eq!(tls("").unwrap().mode(), SslMode::Prefer);
    assert_eq!(tls("sslmode=disable").unwrap().mode(), SslMode::Disable);
    assert_eq!(tls("sslmode=require").unwrap().mode(), SslMode::Require);
    assert_eq!(
        tls("sslmode=verify-full").unwrap().root(),
        &RootCert::System
    );
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, self_signed_pem()).unwrap();
    let t = tls(&format!("sslmode=require&sslrootcert={}", ca.display())).unwrap();
    assert_eq!(t.mode(), SslMode::VerifyCa);
    assert_eq!(t.root(), &RootCert::File(ca));
}

fn self_signed_pem() -> Vec<u8> {
    use openssl::asn1::Asn1Time;
    let key = openssl::pkey::PKey::generate_ed25519().unwrap();
    let mut name = openssl::x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", "test").unwrap();
    let name = name.build();
    let mut b = openssl::x509::X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    b.set_pubkey(&key).unwrap();
    b.sign(&key, openssl::hash::MessageDigest::null()).unwrap();
    b.build().to_pem().unwrap()
}

#[test]
fn bad_tls_settings_say_what_to_change() {
    for (params, expected) in [
        ("sslmode=verify", "is not one of disable, prefer"),
        ("sslmode=allow", "use prefer"),
        (
            "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            "cannot read sslrootcert \"/nonexistent/ca.pem\"",
        ),
        (
            "sslmode=verify-ca&sslrootcert=/dev/null",
            "holds no PEM certificate",
        ),
        (
            "sslnegotiation=direct",
            "sslnegotiation=\"direct\" is not supported",
        ),
    ] {
        let err = tls(params).unwrap_err();
        assert!(err.contains(expected), "{params}: {err}");
        assert!(!err.contains("s3cret"), "{err}");
    }
}

#[test]
fn refusal_hints_name_the_setting_to_change() {
    let hba = |tail: &str| {
        format!("pg_hba.conf rejects connection for host \"127.0.0.1\", user \"u\", database \"d\", {tail}")
    };
    let hint = |code: &str, message: &str| refusal_hint(code, message).unwrap_or_default();
    assert!(hint("28000", &hba("no encryption")).contains("sslmode=require"));
    assert!(hint(
        "28000",
        "no pg_hba.conf entry for host \"h\", user \"u\", database \"d\", no encryption"
    )
    .contains("sslmode=require"));
    assert!(hint("28000", &hba("SSL encryption")).contains("pg_hba.conf"));
    assert!(
        hint("28P01", "password authentication failed for user \"u\"")
            .contains("check the password")
    );
    assert!(hint("28000", "role \"x\" does not exist").contains("create the role"));
    assert!(hint("3D000", "database \"x\" does not exist").contains("create the database"));
    assert_eq!(
        refusal_hint("57P03", "the database system is starting up"),
        None
    );
}
