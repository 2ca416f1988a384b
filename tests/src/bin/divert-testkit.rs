//! Real peers for divert's kernel tests.
//!
//! * `server PORT…`: listens on 0.0.0.0 and [::] (v6-only) at each port and
//!   answers every connection with `server <its local address>`.
//! * `http ADDR BODY`: a minimal HTTP/1.1 server that answers every request
//!   with BODY.
//! * `proxy ADDR…`: a transparent proxy's front half: for each accepted
//!   connection it asks `SO_ORIGINAL_DST` (SOL_IP or SOL_IPV6 by the socket's
//!   family), as Envoy and squid do, and answers
//!   `proxy <its local address> orig=<original destination or none>`. When
//!   the call of the other family answers too (which the kernel's never
//!   does), ` also=<its answer>` follows.
//! * `tproxy ADDR…`: `proxy` with `IP_TRANSPARENT` listeners, the inbound
//!   listener of a TPROXY-mode proxy: a connection TPROXY hands it keeps
//!   its original destination as its local address.
//! * `udp-server ADDR…`: answers every datagram to each ADDR with
//!   `udp <its local address> from=<the sender>`.
//! * `udp DST`: sends one datagram from a socket connected to DST and
//!   prints the answer and ` peer=<the answer's source>`; `error …` when
//!   none comes.
//! * `dns-server ANSWER ADDR…`: a DNS server on each ADDR, UDP and TCP:
//!   every A query is answered with the address ANSWER (so the answer
//!   says which server answered), every other query with no records.
//! * `dns NAME SERVER [--tcp] [--unconnected] [--mapped]`: asks SERVER for
//!   NAME's A record over connected UDP (`--unconnected`: `sendto` and
//!   `recvfrom`; `--tcp`: TCP; `--mapped`: an IPv4 SERVER through an
//!   AF_INET6 socket as `::ffff:a.b.c.d`) and prints `answer=<address>
//!   from=<the reply's source>` (UDP; TCP: the peer), then ` peer=<getpeername()>`
//!   for a connected socket; `error …` when no answer comes. `--also
//!   SERVER2` (unconnected): the same socket asks SERVER2 too, before
//!   reading, and a line is printed for each of the two replies.
//! * `late-proxy ADDR MS`: accepts, waits MS milliseconds, then asks
//!   `SO_ORIGINAL_DST` and prints `late orig=<…>` on stdout (one line per
//!   connection): a proxy that asks after the client may have gone.
//! * `client DST [--mapped] [--mptcp] [--bind ADDR] [--close rst|last|now]`:
//!   connects (with `--mapped`, an IPv4 DST through an AF_INET6 socket as
//!   `::ffff:a.b.c.d`; with `--mptcp`, an IPPROTO_MPTCP socket; with
//!   `--bind`, from that address and port, SO_REUSEADDR), prints the line it
//!   got and ` peer=<getpeername()>`; exit 1 with `error …` otherwise.
//!   `--close` ends the connection: `rst` (SO_LINGER 0 after the line),
//!   `last` (read to the server's EOF, so its FIN is first), `now` (close
//!   right after connecting, before any answer: our FIN first; prints
//!   `closed peer=…`).
//! * `connects DST N`: N connects to DST one after another, each closed at
//!   once; a refused connect counts as made (the kernel judged it). Prints
//!   `connects N refused R`.
//! * `load DST STOP`: four threads connect to DST one connection after
//!   another, each reading the one line answered, until the file STOP
//!   exists. A connection whose line is the proxy's with `orig=DST` is
//!   `ok`; one the server answered went past the proxy (`escaped`); any
//!   other answer, or an error, `failed`. Prints `load ok N escaped E
//!   failed F`, then up to five of the lines that were not ok.
//! * `bytes-server S R eof|first ADDR…`: for each accepted connection,
//!   writes R bytes, then either reads to the client's EOF (`eof`: the
//!   client's FIN is first) or reads exactly S bytes (`first`: its own FIN
//!   goes out first unless the client was quicker), then closes.
//! * `bytes DST N S R MODE`: N connections to DST one after another, each
//!   writing S bytes and reading R, then closing by MODE: `close` (close at
//!   once, whoever's FIN is first), `half` (`shutdown(SHUT_WR)`, read to
//!   EOF, close) or `last` (read to EOF, so the server's FIN is first, then
//!   close). Prints `bytes N sent S*N received R*N`; any short count is an
//!   error.
//! * `hold DST S MS`: one connection to DST, writes S bytes, keeps it open
//!   MS milliseconds (printing `open` once connected), then closes.
//! * `send SOCKET`: sends standard input as it is to the Unix socket
//!   SOCKET, shuts down writing, and prints the one line answered (or
//!   `error …` when the socket was closed without one).
//! * `sockopts DST`: connects and prints, one per line, the results of
//!   getsockopt calls whose answers do not change from one run to the next,
//!   for comparing a process under divert's getsockopt program with one that
//!   is not.
//!
//! Every network wait is bounded; servers run until killed.

use std::{
    io::{BufRead, BufReader, Read, Write},
    mem::{size_of, zeroed},
    net::{
        IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
    },
    os::fd::{AsRawFd, RawFd},
    process::ExitCode,
    thread,
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

const SO_ORIGINAL_DST: libc::c_int = 80;
const TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("server") => server(&args[1..]),
        Some("http") => http(&args[1], args[2].clone()),
        Some("proxy") => proxy(&args[1..]),
        Some("tproxy") => tproxy(&args[1..]),
        Some("udp-server") => udp_server(&args[1..]),
        Some("udp") => udp(&args[1]),
        Some("dns-server") => dns_server(&args[1], &args[2..]),
        Some("dns") => dns(&args[1], &args[2], &args[3..]),
        Some("client") => client(&args[1], &args[2..]),
        Some("late-proxy") => late_proxy(&args[1], &args[2]),
        Some("send") => send(&args[1]),
        Some("sockopts") => sockopts(&args[1]),
        Some("connects") => connects(&args[1], &args[2]),
        Some("load") => load(&args[1], &args[2]),
        Some("bytes-server") => bytes_server(&args[1], &args[2], &args[3], &args[4..]),
        Some("bytes") => bytes(&args[1..]),
        Some("hold") => hold(&args[1], &args[2], &args[3]),
        _ => Err(
            "usage: divert-testkit server|http|proxy|client|sockopts|connects|bytes-server|bytes …"
                .into(),
        ),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("error {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn listen(addr: SocketAddr) -> Result<TcpListener> {
    let domain = Domain::for_address(addr);
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Accept forever on each listener, answering with `answer(stream)`.
fn serve(listeners: Vec<TcpListener>, answer: fn(&mut TcpStream) -> String) -> Result<()> {
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            thread::spawn(move || {
                for s in l.incoming() {
                    let Ok(mut s) = s else { continue };
                    thread::spawn(move || {
                        let line = answer(&mut s);
                        let _ = s.write_all(line.as_bytes());
                        let _ = s.write_all(b"\n");
                    });
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn server(ports: &[String]) -> Result<()> {
    let mut ls = Vec::new();
    for p in ports {
        let port: u16 = p.parse()?;
        ls.push(listen(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port,
        ))?);
        ls.push(listen(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            port,
        ))?);
    }
    serve(ls, |s| match s.local_addr() {
        Ok(a) => format!("server {a}"),
        Err(e) => format!("server ? {e}"),
    })
}

fn http(addr: &str, body: String) -> Result<()> {
    let l = listen(addr.parse()?)?;
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        let body = body.clone();
        thread::spawn(move || {
            let _ = s.set_read_timeout(Some(TIMEOUT));
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if line == "\r\n" || line == "\n" {
                    break;
                }
                line.clear();
            }
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                body.len(),
                body
            );
        });
    }
    Ok(())
}

fn proxy(addrs: &[String]) -> Result<()> {
    let mut ls = Vec::new();
    for a in addrs {
        ls.push(listen(a.parse()?)?);
    }
    serve(ls, |s| {
        let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let v6 = s.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
        let orig = match original_dst(s.as_raw_fd(), v6) {
            Ok(a) => a.to_string(),
            Err(e) => format!("none({e})"),
        };
        match original_dst(s.as_raw_fd(), !v6) {
            Ok(also) => format!("proxy {local} orig={orig} also={also}"),
            Err(_) => format!("proxy {local} orig={orig}"),
        }
    })
}

fn tproxy(addrs: &[String]) -> Result<()> {
    let mut ls = Vec::new();
    for a in addrs {
        let addr: SocketAddr = a.parse()?;
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_ip_transparent(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        ls.push(s.into());
    }
    serve(ls, |s| {
        let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
        format!("tproxy {local}")
    })
}

fn udp_server(addrs: &[String]) -> Result<()> {
    let handles: Vec<_> = addrs
        .iter()
        .map(|a| -> Result<_> {
            let sock = std::net::UdpSocket::bind(a.parse::<SocketAddr>()?)?;
            Ok(thread::spawn(move || {
                let mut buf = [0u8; 512];
                let local = sock.local_addr().map(|a| a.to_string()).unwrap_or_default();
                while let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(format!("udp {local} from={from}").as_bytes(), from);
                }
            }))
        })
        .collect::<Result<_>>()?;
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn udp(dst: &str) -> Result<()> {
    let dst: SocketAddr = dst.parse()?;
    let any: SocketAddr = if dst.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = std::net::UdpSocket::bind(any)?;
    sock.set_read_timeout(Some(TIMEOUT))?;
    sock.connect(dst)?;
    sock.send(b"query")?;
    let mut buf = [0u8; 512];
    let (n, from) = sock.recv_from(&mut buf)?;
    println!("{} peer={from}", String::from_utf8_lossy(&buf[..n]));
    Ok(())
}

/// The answer to one DNS query: A queries get `answer`.
fn dns_answer(query: &[u8], answer: Ipv4Addr) -> Option<Vec<u8>> {
    use hickory_proto::{
        op::{Message, MessageType},
        rr::{rdata::A, RData, Record, RecordType},
    };
    let q = Message::from_vec(query).ok()?;
    let mut r = Message::new(q.metadata.id, MessageType::Response, q.metadata.op_code);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    for question in &q.queries {
        r.add_query(question.clone());
        if question.query_type() == RecordType::A {
            r.add_answer(Record::from_rdata(
                question.name().clone(),
                60,
                RData::A(A(answer)),
            ));
        }
    }
    r.to_vec().ok()
}

fn dns_server(answer: &str, addrs: &[String]) -> Result<()> {
    let answer: Ipv4Addr = answer.parse()?;
    let mut handles = Vec::new();
    for a in addrs {
        let addr: SocketAddr = a.parse()?;
        let udp = std::net::UdpSocket::bind(addr)?;
        handles.push(thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                if let Some(reply) = dns_answer(&buf[..n], answer) {
                    let _ = udp.send_to(&reply, from);
                }
            }
        }));
        let tcp = listen(addr)?;
        handles.push(thread::spawn(move || {
            for mut c in tcp.incoming().flatten() {
                thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(TIMEOUT));
                    let mut len = [0u8; 2];
                    while c.read_exact(&mut len).is_ok() {
                        let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                        if c.read_exact(&mut q).is_err() {
                            break;
                        }
                        let Some(reply) = dns_answer(&q, answer) else {
                            break;
                        };
                        let mut out = (reply.len() as u16).to_be_bytes().to_vec();
                        out.extend(reply);
                        if c.write_all(&out).is_err() {
                            break;
                        }
                    }
                });
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn dns(name: &str, server: &str, opts: &[String]) -> Result<()> {
    use hickory_proto::{
        op::Message,
        rr::{Name, RecordType},
    };
    let (mut tcp, mut connected, mut mapped) = (false, true, false);
    let mut also: Option<SocketAddr> = None;
    let mut it = opts.iter();
    while let Some(o) = it.next() {
        match o.as_str() {
            "--tcp" => tcp = true,
            "--unconnected" => connected = false,
            "--mapped" => mapped = true,
            "--also" => also = Some(it.next().ok_or("--also SERVER2")?.parse()?),
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let server: SocketAddr = server.parse()?;
    let dst: SocketAddr = match (server, mapped) {
        (SocketAddr::V4(v4), true) => (v4.ip().to_ipv6_mapped(), v4.port()).into(),
        _ => server,
    };
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(hickory_proto::op::Query::query(
        Name::from_ascii(name)?,
        RecordType::A,
    ));
    let query = q.to_vec()?;
    let domain = Domain::for_address(dst);
    let (reply, from, peer) = if tcp {
        let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.connect_timeout(&dst.into(), TIMEOUT)?;
        let mut c: TcpStream = s.into();
        let mut out = (query.len() as u16).to_be_bytes().to_vec();
        out.extend(&query);
        c.write_all(&out)?;
        let mut len = [0u8; 2];
        c.read_exact(&mut len)?;
        let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
        c.read_exact(&mut reply)?;
        let peer = c.peer_addr()?;
        (reply, peer, Some(peer))
    } else {
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let u: std::net::UdpSocket = s.into();
        if connected {
            u.connect(dst)?;
            u.send(&query)?;
        } else {
            u.send_to(&query, dst)?;
        }
        let mut buf = [0u8; 1500];
        if let Some(second) = also {
            u.send_to(&query, second)?;
            let mut lines = Vec::new();
            for _ in 0..2 {
                let (n, from) = u.recv_from(&mut buf)?;
                lines.push(format!("answer={} from={from}", first_a(&buf[..n])?));
            }
            println!("{}", lines.join("\n"));
            return Ok(());
        }
        let (n, from) = u.recv_from(&mut buf)?;
        let peer = if connected {
            Some(u.peer_addr()?)
        } else {
            None
        };
        (buf[..n].to_vec(), from, peer)
    };
    let answer = first_a(&reply)?;
    match peer {
        Some(p) => println!("answer={answer} from={from} peer={p}"),
        None => println!("answer={answer} from={from}"),
    }
    Ok(())
}

/// The first A record of a DNS reply, or `none`.
fn first_a(reply: &[u8]) -> Result<String> {
    use hickory_proto::{op::Message, rr::RData};
    let m = Message::from_vec(reply)?;
    Ok(m.answers
        .iter()
        .find_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| "none".into()))
}

fn send(socket: &str) -> Result<()> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input)?;
    // The daemon may answer (and close) before it has read everything.
    let _ = s.write_all(&input);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    if line.is_empty() {
        return Err("closed without an answer".into());
    }
    println!("{}", line.trim());
    Ok(())
}

fn late_proxy(addr: &str, ms: &str) -> Result<()> {
    let l = listen(addr.parse()?)?;
    let wait = Duration::from_millis(ms.parse()?);
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        thread::sleep(wait);
        let v6 = s.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
        match original_dst(s.as_raw_fd(), v6) {
            Ok(a) => println!("late orig={a}"),
            Err(e) => println!("late orig=none({e})"),
        }
    }
    Ok(())
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` for IPv4 sockets,
/// `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` for IPv6 ones.
fn original_dst(fd: RawFd, v6: bool) -> std::io::Result<SocketAddr> {
    // SAFETY: plain getsockopt into correctly sized, zeroed sockaddr buffers.
    unsafe {
        if v6 {
            let mut sa: libc::sockaddr_in6 = zeroed();
            let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                SO_ORIGINAL_DST,
                (&mut sa as *mut libc::sockaddr_in6).cast(),
                &mut len,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
            Ok(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sa.sin6_port),
                0,
                0,
            )))
        } else {
            let mut sa: libc::sockaddr_in = zeroed();
            let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::SOL_IP,
                SO_ORIGINAL_DST,
                (&mut sa as *mut libc::sockaddr_in).cast(),
                &mut len,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
            Ok(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sa.sin_port),
            )))
        }
    }
}

fn connect(dst: SocketAddr, mapped: bool) -> Result<Socket> {
    connect_with(dst, mapped, Protocol::TCP, None)
}

fn connect_with(
    dst: SocketAddr,
    mapped: bool,
    protocol: Protocol,
    bind: Option<SocketAddr>,
) -> Result<Socket> {
    let target: SocketAddr = match (dst, mapped) {
        (SocketAddr::V4(v4), true) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        _ => dst,
    };
    let s = Socket::new(Domain::for_address(target), Type::STREAM, Some(protocol))?;
    if target.is_ipv6() {
        s.set_only_v6(false)?;
    }
    if let Some(src) = bind {
        s.set_reuse_address(true)?;
        s.bind(&src.into())?;
    }
    s.connect_timeout(&target.into(), TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    Ok(s)
}

fn client(dst: &str, opts: &[String]) -> Result<()> {
    let (mut mapped, mut protocol, mut bind, mut close) = (false, Protocol::TCP, None, None);
    let mut it = opts.iter();
    while let Some(o) = it.next() {
        match o.as_str() {
            "--mapped" => mapped = true,
            "--mptcp" => protocol = Protocol::MPTCP,
            "--bind" => bind = Some(it.next().ok_or("--bind ADDR")?.parse()?),
            "--close" => close = Some(it.next().ok_or("--close MODE")?.clone()),
            o => return Err(format!("unknown client option {o:?}").into()),
        }
    }
    let s = connect_with(dst.parse()?, mapped, protocol, bind)?;
    let peer = s
        .peer_addr()?
        .as_socket()
        .ok_or("peer is not an IP socket")?;
    if close.as_deref() == Some("now") {
        drop(s);
        println!("closed peer={peer}");
        return Ok(());
    }
    let mut line = String::new();
    let mut r = BufReader::new(TcpStream::from(s.try_clone()?));
    r.read_line(&mut line)?;
    match close.as_deref() {
        None => {}
        Some("rst") => s.set_linger(Some(Duration::ZERO))?,
        Some("last") => {
            let mut rest = Vec::new();
            r.read_to_end(&mut rest)?;
        }
        Some(m) => return Err(format!("unknown close mode {m:?}").into()),
    }
    println!("{} peer={peer}", line.trim());
    Ok(())
}

/// Raw getsockopt: `(errno or 0, returned length, bytes)`.
fn raw_getsockopt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    buflen: usize,
) -> (i32, usize, Vec<u8>) {
    let mut buf = vec![0u8; buflen];
    let mut len = buflen as libc::socklen_t;
    // SAFETY: buf has buflen bytes and len says so.
    let rc = unsafe { libc::getsockopt(fd, level, name, buf.as_mut_ptr().cast(), &mut len) };
    let errno = if rc == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    };
    let n = (len as usize).min(buflen);
    buf.truncate(n);
    (errno, len as usize, buf)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sockopts(dst: &str) -> Result<()> {
    let s = connect(dst.parse()?, false)?;
    // Read to EOF: the server has closed, so the state (CLOSE_WAIT) is settled.
    let mut sink = Vec::new();
    let _ = (&s).read_to_end(&mut sink);
    let fd = s.as_raw_fd();
    let report = |label: &str, (errno, len, bytes): (i32, usize, Vec<u8>)| {
        // Failed calls leave the buffer as the caller passed it: show the length only.
        let shown = if errno == 0 {
            &bytes[..bytes.len().min(64)]
        } else {
            &[][..]
        };
        println!("{label} errno={errno} len={len} bytes={}", hex(shown));
    };
    // TCP_INFO: the first 8 bytes (state, ca_state, retransmits, probes,
    // backoff, options, wscale, flags) and the length are stable.
    let (e, len, b) = raw_getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, 512);
    report("TCP_INFO", (e, len, b[..8.min(b.len())].to_vec()));
    let (e, len, b) = raw_getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, 8192);
    report("TCP_INFO(8192)", (e, len, b[..8.min(b.len())].to_vec()));
    report(
        "TCP_NODELAY",
        raw_getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 4),
    );
    report(
        "TCP_CONGESTION",
        raw_getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_CONGESTION, 16),
    );
    report(
        "SO_TYPE",
        raw_getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, 4),
    );
    report(
        "SO_DOMAIN",
        raw_getsockopt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN, 4),
    );
    report(
        "SO_ERROR",
        raw_getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, 4),
    );
    report(
        "SO_PEERCRED(tcp)",
        raw_getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, 12),
    );
    report(
        "SO_ORIGINAL_DST(unknown)",
        raw_getsockopt(fd, libc::SOL_IP, SO_ORIGINAL_DST, 16),
    );
    report(
        "SO_ORIGINAL_DST(8192)",
        raw_getsockopt(fd, libc::SOL_IP, SO_ORIGINAL_DST, 8192),
    );
    report("IP_TTL", raw_getsockopt(fd, libc::SOL_IP, libc::IP_TTL, 4));
    report(
        "bogus option",
        raw_getsockopt(fd, libc::SOL_SOCKET, 9999, 64),
    );
    // A Unix socket pair: SO_PEERCRED names this very process.
    let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    let (e, len, b) = raw_getsockopt(a.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, 12);
    let same_pid =
        b.len() >= 4 && u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) == std::process::id();
    println!(
        "SO_PEERCRED(unix) errno={e} len={len} pid_is_self={same_pid} ids={}",
        hex(&b[4..b.len().min(12)])
    );
    // Larger than a page: the program only sees the first PAGE_SIZE bytes.
    let (e, len, b) = raw_getsockopt(a.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERSEC, 16384);
    println!(
        "SO_PEERSEC(16384) errno={e} len={len} bytes={}",
        hex(&b[..b.len().min(64)])
    );
    Ok(())
}

fn connects(dst: &str, n: &str) -> Result<()> {
    let dst: SocketAddr = dst.parse()?;
    let n: usize = n.parse()?;
    let mut refused = 0;
    for _ in 0..n {
        match TcpStream::connect_timeout(&dst, TIMEOUT) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
            Err(e) => return Err(e.into()),
        }
    }
    println!("connects {n} refused {refused}");
    Ok(())
}

fn load(dst: &str, stop: &str) -> Result<()> {
    let dst: SocketAddr = dst.parse()?;
    let stop = std::path::PathBuf::from(stop);
    let one = move || -> std::result::Result<String, String> {
        let s = TcpStream::connect_timeout(&dst, TIMEOUT).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| format!("read: {e}"))?;
        Ok(line.trim().to_string())
    };
    let orig = format!("orig={dst}");
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (stop, orig) = (stop.clone(), orig.clone());
            thread::spawn(move || {
                let (mut ok, mut escaped, mut bad) = (0u64, 0u64, Vec::new());
                while !stop.exists() {
                    match one() {
                        Ok(l) if l.starts_with("proxy ") && l.ends_with(&orig) => ok += 1,
                        Ok(l) if l.starts_with("server ") => {
                            escaped += 1;
                            bad.push(l)
                        }
                        Ok(l) => bad.push(l),
                        Err(e) => bad.push(e),
                    }
                }
                (ok, escaped, bad)
            })
        })
        .collect();
    let (mut ok, mut escaped, mut bad) = (0, 0, Vec::new());
    for t in threads {
        let (o, e, b) = t.join().map_err(|_| "a load thread panicked")?;
        ok += o;
        escaped += e;
        bad.extend(b);
    }
    println!(
        "load ok {ok} escaped {escaped} failed {}",
        bad.len() as u64 - escaped
    );
    for l in bad.iter().take(5) {
        println!("{l}");
    }
    Ok(())
}

fn bytes_server(s: &str, r: &str, close: &str, addrs: &[String]) -> Result<()> {
    let (s, r): (usize, usize) = (s.parse()?, r.parse()?);
    let to_eof = match close {
        "eof" => true,
        "first" => false,
        c => return Err(format!("unknown close order {c:?}").into()),
    };
    let mut handles = Vec::new();
    for a in addrs {
        let l = listen(a.parse()?)?;
        handles.push(thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(TIMEOUT));
                    let _ = c.write_all(&vec![b'r'; r]);
                    if to_eof {
                        let _ = c.read_to_end(&mut Vec::new());
                    } else {
                        let _ = c.read_exact(&mut vec![0; s]);
                    }
                });
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn bytes(args: &[String]) -> Result<()> {
    let [dst, n, s, r, mode] = args else {
        return Err("usage: bytes DST N S R close|half|last".into());
    };
    let dst: SocketAddr = dst.parse()?;
    let (n, s, r): (usize, usize, usize) = (n.parse()?, s.parse()?, r.parse()?);
    for i in 0..n {
        let mut c = TcpStream::connect_timeout(&dst, TIMEOUT)?;
        c.set_read_timeout(Some(TIMEOUT))?;
        c.write_all(&vec![b's'; s])?;
        let mut got = vec![0; r];
        c.read_exact(&mut got)
            .map_err(|e| format!("connection {i}: reading {r} bytes: {e}"))?;
        match mode.as_str() {
            "close" => {}
            "half" | "last" => {
                if mode == "half" {
                    c.shutdown(std::net::Shutdown::Write)?;
                }
                let mut rest = Vec::new();
                c.read_to_end(&mut rest)?;
                if !rest.is_empty() {
                    return Err(format!("connection {i}: {} bytes past {r}", rest.len()).into());
                }
            }
            m => return Err(format!("unknown close mode {m:?}").into()),
        }
    }
    println!("bytes {n} sent {} received {}", s * n, r * n);
    Ok(())
}

fn hold(dst: &str, s: &str, ms: &str) -> Result<()> {
    let dst: SocketAddr = dst.parse()?;
    let (s, ms): (usize, u64) = (s.parse()?, ms.parse()?);
    let mut c = TcpStream::connect_timeout(&dst, TIMEOUT)?;
    c.write_all(&vec![b's'; s])?;
    println!("open");
    std::io::stdout().flush()?;
    thread::sleep(Duration::from_millis(ms));
    Ok(())
}
