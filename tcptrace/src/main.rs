fn main() -> anyhow::Result<()> {
    let mut p = tcptrace::bpf::Probes::attach(Default::default())?;
    println!("attached {:?}", p.attached());
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        p.drain(|e| println!("{e:?}"));
    }
    println!("{:?}", p.counters());
    Ok(())
}
