//! The `ringhub` executable: mimalloc as the global allocator (the system allocator with the
//! `system-allocator` feature, for heap profilers such as heaptrack), then the command line.

use std::io::Write;

#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match server::cli::parse_args(&args) {
        Ok(invocation) => {
            let env: Vec<(String, String)> = std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect();
            // Not locked here: `serve` runs inside and its threads log to stdout.
            server::cli::run(
                &invocation,
                env,
                &mut std::io::stdout(),
                &mut std::io::stderr(),
            )
        }
        Err(message) => {
            let _ = writeln!(std::io::stderr(), "ringhub: {message}");
            server::cli::EXIT_USAGE
        }
    };
    std::process::exit(code);
}
