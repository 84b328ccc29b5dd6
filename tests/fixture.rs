//! The `cwreap-fixture` program: leaky TCP servers and their clients for the tests and the
//! benchmarks. Its code is in the test kit (testkit/src/fixture/); this binary of the cwreap
//! package exists so that cargo builds it before running the tests and benchmarks.

fn main() {
    cwreap_testkit::fixture::main();
}
