//! `nabla info`: every adapter with its capability record.

use nabla::gpu::enumerate_adapters;
use nabla::{Error, Gpu, Result};

pub fn run() -> Result<()> {
    let adapters = enumerate_adapters()?;
    if adapters.is_empty() {
        return Err(Error::NoAdapter {
            filter: String::new(),
        });
    }
    let chosen = Gpu::new()
        .ok()
        .map(|g| (g.caps().name.clone(), g.caps().backend.clone()));
    for (i, a) in adapters.into_iter().enumerate() {
        let info = a.get_info();
        let name = info.name.clone();
        let this = (info.name, format!("{:?}", info.backend));
        let mark = if chosen.as_ref() == Some(&this) {
            "  (default choice)"
        } else {
            ""
        };
        println!("== adapter {i}{mark}");
        match Gpu::from_adapter(a) {
            Ok(g) => println!("{}\n", g.caps()),
            Err(e) => println!("{name}: cannot open: {e}\n"),
        }
    }
    println!("Choose with NABLA_ADAPTER=<name substring> and NABLA_BACKEND=vulkan|metal|dx12|gl.");
    Ok(())
}
