"""outbox-relay benchmark (docs/benchmarks.md explains what it measures and how to read it).

In one run, for each workload and on the same WAL range:
  1. read limit:  pg_recvlogical (pgoutput) reads the range to /dev/null;
  2. relay:       target/release/outbox-relay catches up the range from its slot until
                  confirmed_flush_lsn reaches the range's end (events/s, CPU, peak RSS);
  3. write limit: examples/bench_producer sends as many records of the same size and
                  keys to the same broker with the relay's producer settings;
then the live latency at fixed commit rates (pgbench, single-row transactions),
read from the relay's histogram and cross-checked by a consumer (examples/bench_latency);
with --rtt-sweep also the live phase against a mock broker with fixed round-trip times
(examples/bench_mock_broker) for several linger.ms values.

Starts its own PostgreSQL cluster and tansu broker on free ports unless --pg-url /
--brokers are given, and stops and removes everything it started, also on failure
or Ctrl-C. Writes results.json and results.md to --out (default target/bench/<time>/).

    bench/run.py                  # default, about 4-5 minutes on 2 cores
    bench/run.py --quick          # about 1 minute (plus the build)
    bench/run.py --profile perf   # also profile two catch-ups (or --profile callgrind)
    bench/run.py --sinks kafka,redis,nats,rabbitmq   # only the sink comparison (phases/sinks.py)

Python 3.11 standard library only; PostgreSQL client programs through subprocess.
"""
