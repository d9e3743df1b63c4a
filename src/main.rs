//! The `qdora` binary: everything lives in the library; this turns `cli::main`'s result into
//! an exit code.

fn main() -> std::process::ExitCode {
    qdora::cli::main()
}
