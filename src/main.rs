//! The `qdora` binary: everything lives in the library; this turns `cli::main`'s result into
//! an exit code.

fn main() -> std::process::ExitCode {
    // One malloc arena for all threads: glibc otherwise gives rayon's workers arenas of their
    // own, each holding on to freed activation buffers, and the peak resident memory of a
    // checkpointed QDoRA run rises by 20–40 MiB with no gain in speed. Freed buffers stay
    // mapped for the next step: by default glibc serves buffers above a moving threshold (at
    // most 32 MiB) with fresh mappings and hands the heap's free top back to the kernel, so
    // full fine-tuning's weight gradients (880 MB on llama-small-1024, made anew each step)
    // came back as fresh pages every step, a page fault per 4 KiB; kept mapped, a 4-step run
    // took 1.05–1.3 M page faults instead of 2.0 M and 4–10 s of system time instead of 15,
    // and the other modes' peaks did not rise (docs/PERFORMANCE.md).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it runs before any other thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
    qdora::cli::main()
}
