//! The two ends of a benchmark connection, each its own process so that each
//! sits in its own cgroup, namespace and CPU: the proxy (what Envoy's
//! outbound listener does first) and a client driven over stdin/stdout.
//!
//! Wire protocol of one connection (IPv4 only):
//!
//! 1. the client takes `t0 = CLOCK_MONOTONIC`, then `connect()`s (blocking)
//!    and sends one mode byte: [`MODE_LATENCY`] or [`MODE_BULK`];
//! 2. the proxy takes `t1 = CLOCK_MONOTONIC` as soon as `accept()` returns,
//!    times its `getsockopt(SOL_IP, SO_ORIGINAL_DST)`, reads the mode byte and
//!    answers with a [`Record`] ([`RECORD_LEN`] bytes);
//! 3. latency mode: the proxy closes at once (so it is back in `accept()`
//!    before the next connect); bulk mode: it reads to EOF and answers with
//!    the byte count (8 bytes, little endian), then closes.
//!
//! `t1 − t0` is the connect latency; CLOCK_MONOTONIC is one clock for every
//! process on the machine.

use std::{
    io::{self, BufRead, Read, Write},
    mem::{size_of, zeroed},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

/// The client's first byte: answer with a [`Record`] and close.
pub const MODE_LATENCY: u8 = b'L';
/// The client's first byte: answer with a [`Record`], then count bytes to EOF.
pub const MODE_BULK: u8 = b'B';
/// Size of [`Record`] on the wire.
pub const RECORD_LEN: usize = 24;
/// No read or write of either end waits longer than this.
const TIMEOUT: Duration = Duration::from_secs(10);
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The proxy's answer to one connection.
///
/// Wire layout, 24 bytes: `accept_ns` u64 LE, `sockopt_ns` u64 LE, one byte
/// 1 if `original_dst` is set, the IPv4 address (4 bytes, network order),
/// the port (2 bytes, network order), one byte of padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// CLOCK_MONOTONIC, ns, when `accept()` returned.
    pub accept_ns: u64,
    /// How long the proxy's `SO_ORIGINAL_DST` call took, ns.
    pub sockopt_ns: u64,
    /// What `SO_ORIGINAL_DST` answered; `None` when it failed (no NAT and no
    /// divert entry for this socket: the floor).
    pub original_dst: Option<SocketAddrV4>,
}

impl Record {
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0..8].copy_from_slice(&self.accept_ns.to_le_bytes());
        b[8..16].copy_from_slice(&self.sockopt_ns.to_le_bytes());
        if let Some(a) = self.original_dst {
            b[16] = 1;
            b[17..21].copy_from_slice(&a.ip().octets());
            b[21..23].copy_from_slice(&a.port().to_be_bytes());
        }
        b
    }

    pub fn decode(b: &[u8; RECORD_LEN]) -> Record {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let original_dst = (b[16] == 1).then(|| {
            SocketAddrV4::new(
                Ipv4Addr::new(b[17], b[18], b[19], b[20]),
                u16::from_be_bytes([b[21], b[22]]),
            )
        });
        Record {
            accept_ns: u64_at(0),
            sockopt_ns: u64_at(8),
            original_dst,
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process.
pub fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime writes one timespec.
    let mut ts: libc::timespec = unsafe { zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Pin the calling process to `cpu` (`sched_setaffinity`).
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(io::Error::from)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(io::Error::from)
}

/// The accepted socket's original destination and how long asking took.
fn original_dst(s: &TcpStream) -> (Option<SocketAddrV4>, u64) {
    // SAFETY: getsockopt writes at most `len` bytes into `sa`.
    let mut sa: libc::sockaddr_in = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let t0 = monotonic_ns();
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut sa as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    let took = monotonic_ns() - t0;
    let addr = (rc == 0).then(|| {
        SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        )
    });
    (addr, took)
}

/// Serve benchmark connections on `listen` one at a time, forever. A broken
/// connection is reported on stderr and the proxy carries on.
pub fn proxy(listen: SocketAddr) -> io::Result<()> {
    let s = Socket::new(
        Domain::for_address(listen),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.bind(&listen.into())?;
    s.listen(4096)?;
    let listener: TcpListener = s.into();
    loop {
        let (mut conn, _) = listener.accept()?;
        let accept_ns = monotonic_ns();
        let (original_dst, sockopt_ns) = original_dst(&conn);
        let record = Record {
            accept_ns,
            sockopt_ns,
            original_dst,
        };
        if let Err(e) = answer(&mut conn, record) {
            eprintln!("divert-bench proxy: {e}");
        }
    }
}

fn answer(conn: &mut TcpStream, record: Record) -> io::Result<()> {
    conn.set_read_timeout(Some(TIMEOUT))?;
    conn.set_write_timeout(Some(TIMEOUT))?;
    let mut mode = [0u8; 1];
    if conn.read(&mut mode)? == 0 {
        // A readiness probe: connected and closed without a word.
        return Ok(());
    }
    conn.write_all(&record.encode())?;
    if mode[0] == MODE_BULK {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            match conn.read(&mut buf)? {
                0 => break,
                n => total += n as u64,
            }
        }
        conn.write_all(&total.to_le_bytes())?;
    }
    Ok(())
}

/// A command to the client process, one JSON object per line on its stdin.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// `count` connections to `dst`, one after another; each is closed with
    /// an RST (`SO_LINGER` 0) when `reset` is set, with a FIN otherwise.
    Connect {
        dst: SocketAddrV4,
        count: usize,
        reset: bool,
        /// Bind connection `i` to source port `first_port + i` instead of
        /// letting the kernel pick (which may reuse a port, and with it a
        /// conntrack entry, within a few thousand connections).
        first_port: Option<u16>,
        /// `Some(dst)`: every connection must reach the proxy with this
        /// original destination (it was redirected); `None`: the proxy's
        /// `SO_ORIGINAL_DST` must fail (it was dialled directly).
        expect_original: Option<SocketAddrV4>,
    },
    /// One connection to `dst` carrying `bytes` bytes to the proxy.
    Bulk { dst: SocketAddrV4, bytes: u64 },
    /// `count` DNS-sized queries to `dst`, each as glibc makes one lookup:
    /// a new UDP socket, `connect`, `send`, `recvfrom`, close. Each answer
    /// must come from `expect_from` (the server asked, whatever answered)
    /// and echo the query.
    Dns {
        dst: SocketAddrV4,
        count: usize,
        expect_from: SocketAddrV4,
    },
}

/// The client's answer to a [`Command`], one JSON object per line.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    /// Per connection, `accept()` − `connect()` start, ns.
    pub latency_ns: Vec<u64>,
    /// Per connection, the proxy's `SO_ORIGINAL_DST` call, ns.
    pub sockopt_ns: Vec<u64>,
    /// Wall time of the whole command, ns.
    pub elapsed_ns: u64,
    /// Bytes the proxy counted (bulk).
    pub bytes: u64,
    /// Why the command failed, if it did.
    pub error: Option<String>,
}

/// Read [`Command`]s from stdin until EOF and answer each on stdout.
pub fn client() -> io::Result<()> {
    let stdin = io::stdin();
    let mut stdout = io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let reply = match serde_json::from_str::<Command>(&line) {
            Ok(cmd) => run(&cmd).unwrap_or_else(|e| Reply {
                error: Some(e),
                ..Reply::default()
            }),
            Err(e) => Reply {
                error: Some(format!("bad command {line:?}: {e}")),
                ..Reply::default()
            },
        };
        serde_json::to_writer(&mut stdout, &reply)?;
        stdout.write_all(b"\n")?;
        stdout.flush()?;
    }
    Ok(())
}

fn run(cmd: &Command) -> Result<Reply, String> {
    let start = monotonic_ns();
    let mut reply = Reply::default();
    match *cmd {
        Command::Connect {
            dst,
            count,
            reset,
            first_port,
            expect_original,
        } => {
            if first_port.is_some_and(|p| p as usize + count > 65_536) {
                return Err(format!(
                    "{count} source ports from {first_port:?} do not fit"
                ));
            }
            reply.latency_ns.reserve(count);
            reply.sockopt_ns.reserve(count);
            for i in 0..count {
                let port = first_port.map(|p| p + i as u16);
                let (latency, record) = one_connection(dst, reset, port)
                    .map_err(|e| format!("connection {i} of {count} to {dst}: {e}"))?;
                if record.original_dst != expect_original {
                    return Err(format!(
                        "connection {i} to {dst} reached the proxy with original destination \
                         {:?}, expected {:?}: the configuration does not divert as it should",
                        record.original_dst, expect_original
                    ));
                }
                reply.latency_ns.push(latency);
                reply.sockopt_ns.push(record.sockopt_ns);
            }
        }
        Command::Dns {
            dst,
            count,
            expect_from,
        } => {
            reply.latency_ns.reserve(count);
            for i in 0..count {
                let (latency, from) = dns_query(dst, i as u64)
                    .map_err(|e| format!("query {i} of {count} to {dst}: {e}"))?;
                if from != SocketAddr::V4(expect_from) {
                    return Err(format!(
                        "query {i} to {dst} was answered from {from}, expected {expect_from}"
                    ));
                }
                reply.latency_ns.push(latency);
            }
        }
        Command::Bulk { dst, bytes } => {
            reply.bytes = bulk(dst, bytes).map_err(|e| format!("bulk to {dst}: {e}"))?;
            if reply.bytes != bytes {
                return Err(format!(
                    "bulk to {dst}: the proxy counted {} bytes of {bytes}",
                    reply.bytes
                ));
            }
        }
    }
    reply.elapsed_ns = monotonic_ns() - start;
    Ok(reply)
}

fn connect(
    dst: SocketAddrV4,
    reset: bool,
    port: Option<u16>,
    mode: u8,
) -> io::Result<(TcpStream, u64)> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    if reset {
        s.set_linger(Some(Duration::ZERO))?;
    }
    if let Some(p) = port {
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, p)).into())?;
    }
    let t0 = monotonic_ns();
    s.connect_timeout(&SocketAddr::V4(dst).into(), TIMEOUT)?;
    let mut s: TcpStream = s.into();
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(&[mode])?;
    Ok((s, t0))
}

fn read_record(s: &mut TcpStream) -> io::Result<Record> {
    let mut b = [0u8; RECORD_LEN];
    s.read_exact(&mut b)?;
    Ok(Record::decode(&b))
}

fn one_connection(dst: SocketAddrV4, reset: bool, port: Option<u16>) -> io::Result<(u64, Record)> {
    let (mut s, t0) = connect(dst, reset, port, MODE_LATENCY)?;
    let record = read_record(&mut s)?;
    Ok((record.accept_ns.saturating_sub(t0), record))
}

/// One lookup's worth of UDP: socket, connect, send a 40-byte query
/// (about an A query's size) numbered `n`, receive the echo. Returns the
/// time from the socket's creation to the answer and the answer's source.
fn dns_query(dst: SocketAddrV4, n: u64) -> io::Result<(u64, SocketAddr)> {
    let mut query = [0u8; 40];
    query[..8].copy_from_slice(&n.to_le_bytes());
    let t0 = monotonic_ns();
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.connect(&SocketAddr::V4(dst).into())?;
    let u: std::net::UdpSocket = s.into();
    u.send(&query)?;
    let mut buf = [0u8; 512];
    let (len, from) = u.recv_from(&mut buf)?;
    let took = monotonic_ns() - t0;
    if buf[..len] != query {
        return Err(io::Error::other("the answer is not the query's echo"));
    }
    Ok((took, from))
}

/// The DNS proxy's stand-in: echo every datagram on `listen` to its
/// sender, forever.
pub fn dns_proxy(listen: SocketAddr) -> io::Result<()> {
    let sock = std::net::UdpSocket::bind(listen)?;
    let mut buf = [0u8; 512];
    loop {
        let (n, from) = sock.recv_from(&mut buf)?;
        sock.send_to(&buf[..n], from)?;
    }
}

fn bulk(dst: SocketAddrV4, bytes: u64) -> io::Result<u64> {
    let (mut s, _) = connect(dst, false, None, MODE_BULK)?;
    read_record(&mut s)?;
    let buf = vec![0x5au8; 1 << 16];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)?;
    Ok(u64::from_le_bytes(count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_the_wire() {
        for original_dst in [None, Some("10.212.0.2:80".parse().unwrap())] {
            let r = Record {
                accept_ns: 123_456_789_012,
                sockopt_ns: 987,
                original_dst,
            };
            assert_eq!(Record::decode(&r.encode()), r);
        }
    }
}
