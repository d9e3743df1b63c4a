//! The `qdora` binary: everything lives in the library; this turns `cli::main`'s result into
//! an exit code.

fn main() -> std::process::ExitCode {
    // One malloc arena for all threads: glibc otherwise gives rayon's workers arenas of their
    // own, each holding on to freed activation buffers, and the peak resident memory of a
    // checkpointed QDoRA run rises by 20–40 MiB with no gain in speed (docs/PERFORMANCE.md).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it runs before any other thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    qdora::cli::main()
}
