//! Fetch a model into the cache the way `--model` does, and print its path:
//! `cargo run -p switchyard-engine --example fetch_model -- gemma3-270m` (or `smollm2`).

use switchyard_engine::model_store;

fn main() {
    let name = std::env::args().nth(1).unwrap_or_else(|| "smollm2".into());
    match model_store::resolve(Some(std::path::Path::new(&name))) {
        Ok(p) => println!("{}", p.display()),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
