// explain --where's Rust server (std): a thread per connection reads a command byte, then
// reads until EOF in leak_conn (forgets the stream: the leak) or in tidy_conn (drops it,
// which closes). Built by the tests with rustc. Prints "listening PORT" once it accepts.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

#[inline(never)]
fn leak_conn(mut s: TcpStream) {
    let mut buf = [0u8; 256];
    while s.read(&mut buf).is_ok_and(|n| n > 0) {} // where: leak
    std::mem::forget(s); // EOF: the fd stays open
}

#[inline(never)]
fn tidy_conn(mut s: TcpStream) {
    let mut buf = [0u8; 256];
    while s.read(&mut buf).is_ok_and(|n| n > 0) {} // where: tidy
}

fn handle(mut s: TcpStream) {
    let mut cmd = [0u8; 1];
    if s.read_exact(&mut cmd).is_err() {
        return;
    }
    if cmd[0] == b'L' {
        leak_conn(s)
    } else {
        tidy_conn(s)
    }
}

fn main() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("local address").port();
    let mut out = std::io::stdout();
    writeln!(out, "listening {port}").and_then(|()| out.flush()).expect("stdout");
    for s in l.incoming().flatten() {
        std::thread::spawn(move || handle(s));
    }
}
