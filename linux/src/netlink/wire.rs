//! Where a [`super::Diag`]'s requests go and its answers come from: the kernel, or in
//! tests a datagram socket whose other end plays it.

use std::io;

use netlink_sys::Socket;

/// Where requests go and answers come from.
pub(super) enum Wire {
    /// NETLINK_SOCK_DIAG: the kernel.
    Kernel(Socket),
    /// A datagram socket whose other end plays the kernel (see `Diag::over`).
    #[cfg(test)]
    Fake(std::os::unix::net::UnixDatagram),
}

impl Wire {
    pub(super) fn send(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Wire::Kernel(s) => s.send(buf, 0),
            #[cfg(test)]
            Wire::Fake(s) => s.send(buf),
        }
    }

    /// One datagram, and whether it came from the kernel (port id 0). A connected netlink
    /// socket only accepts the kernel's datagrams anyway; this says so explicitly.
    pub(super) fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        match self {
            Wire::Kernel(s) => {
                let (n, from) = s.recv_from(&mut &mut buf[..], 0)?;
                Ok((n, from.port_number() == 0))
            }
            #[cfg(test)]
            Wire::Fake(s) => Ok((s.recv(buf)?, true)),
        }
    }
}
