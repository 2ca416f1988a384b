fn main() {
    let bytes = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/divert"));
    let mut ebpf = aya::Ebpf::load(bytes).unwrap();
    for (name, prog) in ebpf.programs_mut() {
        let r = match prog {
            aya::programs::Program::CgroupSockAddr(p) => p.load(),
            aya::programs::Program::SockOps(p) => p.load(),
            aya::programs::Program::CgroupSockopt(p) => p.load(),
            _ => Ok(()),
        };
        println!("{name}: {r:?}");
    }
}
