//! Data-parallel training over MPI (`cargo test --release --features mpi --test mpi`; needs
//! Open MPI's `mpirun`): two ranks with batch b give the numbers of one process with
//! `--grad-accum 2` (same loss curve, same adapter or model), also across a kill and a
//! resume; a rank that dies or fails ends the whole job with its rank named; a checkpoint of
//! another world size is refused.
#![cfg(feature = "mpi")]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use qdora::io::Checkpoint;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn train_args(mode: &str, steps: usize, out: &Path) -> Vec<String> {
    let data = root().join("tests/fixtures/data/text.jsonl");
    let model = root().join("models/stories260K");
    let mut a: Vec<String> = [
        "train",
        "--mode",
        mode,
        "--batch-size",
        "2",
        "--seq-len",
        "32",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(
        [
            "--seed",
            "3",
            "--lr",
            "1e-2",
            "--lora-dropout",
            "0.1",
            "--eval-every",
            "5",
        ]
        .map(String::from),
    );
    a.push("--max-steps".into());
    a.push(steps.to_string());
    for (k, v) in [
        ("--model", &model),
        ("--data", &data),
        ("--out", &out.to_path_buf()),
    ] {
        a.push(k.into());
        a.push(v.display().to_string());
    }
    a
}

fn single(args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qdora"));
    c.args(args).args(["--grad-accum", "2"]);
    c
}

fn mpirun(args: &[String]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        .arg(env!("CARGO_BIN_EXE_qdora"))
        .args(["--threads", "1"])
        .args(args);
    // its own process group, so a test can kill the launcher and every rank at once
    c.process_group(0);
    c
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// (step, loss, grad_norm, eval_loss) of each metrics line.
fn metrics(out: &Path) -> Vec<(u64, f64, f64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            (
                v["step"].as_u64().unwrap(),
                f("loss"),
                f("grad_norm"),
                f("eval_loss"),
            )
        })
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-5 * b.abs().max(1e-12)
}

fn assert_same_run(a: &Path, b: &Path, weights: &str) {
    let (ma, mb) = (metrics(a), metrics(b));
    assert_eq!(ma.len(), mb.len(), "metrics lines");
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(x.0, y.0);
        assert!(
            close(x.1, y.1) && close(x.2, y.2) && close(x.3, y.3),
            "{x:?} vs {y:?}"
        );
    }
    let (ca, cb) = (
        Checkpoint::open(&a.join(weights)).unwrap(),
        Checkpoint::open(&b.join(weights)).unwrap(),
    );
    let keys: Vec<String> = ca.keys().map(String::from).collect();
    assert!(!keys.is_empty());
    for k in keys {
        let (x, y) = (
            ca.get(&k).unwrap().to_f32().unwrap(),
            cb.get(&k).unwrap().to_f32().unwrap(),
        );
        for (p, q) in x.iter().zip(&y) {
            assert!(close(*p as f64, *q as f64), "{k}: {p} vs {q}");
        }
    }
}

#[test]
fn two_ranks_match_one_process_with_grad_accum_2() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, weights) in [
        ("qdora", "adapter_model.safetensors"),
        ("lora", "adapter_model.safetensors"),
        ("full", "model.safetensors"),
    ] {
        let (a, b) = (
            dir.path().join(format!("1-{mode}")),
            dir.path().join(format!("2-{mode}")),
        );
        ok(single(&train_args(mode, 6, &a)).output().unwrap());
        let o = ok(mpirun(&train_args(mode, 6, &b)).output().unwrap());
        assert_same_run(&a, &b, weights);
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(b.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(summary["ranks"], 2);
        // rank 0 alone reports
        let text = String::from_utf8_lossy(&o.stdout);
        assert_eq!(text.matches("wrote ").count(), 1, "{text}");
    }
}

fn kill_group(child: &std::process::Child) {
    let pgid = child.id() as i32;
    // SAFETY-free: kill(2) through the shell's kill, on the process group we created.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .status();
}

fn wait_for(p: &Path) {
    let t0 = Instant::now();
    while !p.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn killed_and_resumed_two_rank_run_matches_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 120;
    let want = dir.path().join("single");
    ok(single(&train_args("qdora", steps, &want)).output().unwrap());

    let out = dir.path().join("killed");
    let mut args = train_args("qdora", steps, &out);
    args.extend(["--save-every", "10"].map(String::from));
    let mut child = mpirun(&args).spawn().unwrap();
    wait_for(&out.join("checkpoint-20").join("state.json"));
    // as a lost machine would: every rank at once (they are not in mpirun's process group)
    for rank in 0..2 {
        if let Some(pid) = rank_pid(&out, rank) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
    kill_group(&child);
    let _ = child.wait();
    let t0 = Instant::now();
    while rank_pid(&out, 0).is_some() || rank_pid(&out, 1).is_some() {
        assert!(t0.elapsed() < Duration::from_secs(60), "ranks never exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "the run was killed before it finished"
    );
    args.push("--resume".into());
    ok(mpirun(&args).output().unwrap());
    assert_same_run(&want, &out, "adapter_model.safetensors");
}

/// The pid of the rank `rank` process of a run writing to `out`.
fn rank_pid(out: &Path, rank: usize) -> Option<u32> {
    let needle = out.display().to_string();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        let env = String::from_utf8_lossy(&env);
        if cmd.contains("qdora")
            && !cmd.contains("mpirun")
            && cmd.contains(&needle)
            && env.contains(&format!("OMPI_COMM_WORLD_RANK={rank}\0"))
        {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_dead_rank_ends_the_job_and_keeps_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut args = train_args("qdora", 100_000, &out);
    args.extend(["--save-every", "10"].map(String::from));
    let child = mpirun(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&out.join("checkpoint-10").join("state.json"));
    let pid = rank_pid(&out, 1).expect("rank 1 is running");
    let t0 = Instant::now();
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    let o = child.wait_with_output().unwrap();
    let took = t0.elapsed();
    println!(
        "the job ended {:.2} s after rank 1 was killed",
        took.as_secs_f64()
    );
    assert!(!o.status.success());
    assert!(took < Duration::from_secs(30), "took {took:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("rank 1"), "{err}");
    let last = qdora::train::checkpoint::latest(&out).unwrap();
    assert!(last.join("trainable.safetensors").exists());
}

#[test]
fn a_failing_rank_names_itself_and_stops_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"text\": 5}\n").unwrap();
    let out = dir.path().join("run");
    let mut args = train_args("qdora", 3, &out);
    let i = args.iter().position(|a| a == "--data").unwrap();
    args[i + 1] = bad.display().to_string();
    let t0 = Instant::now();
    let o = mpirun(&args).output().unwrap();
    assert!(!o.status.success());
    assert!(t0.elapsed() < Duration::from_secs(60));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("error on rank") && err.contains("bad.jsonl:2:"),
        "{err}"
    );
}

#[test]
fn a_checkpoint_of_another_world_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut args = train_args("qdora", 6, &out);
    args.extend(["--save-every", "2"].map(String::from));
    // one process, stopped after its checkpoint by a shorter run
    let mut first = args.clone();
    let i = first.iter().position(|a| a == "--max-steps").unwrap();
    first[i + 1] = "3".into();
    ok(Command::new(env!("CARGO_BIN_EXE_qdora"))
        .args(&first)
        .output()
        .unwrap());
    assert!(out.join("checkpoint-2").exists());
    args.push("--resume".into());
    let o = mpirun(&args).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("written by a run of 1 rank(s)"), "{err}");
}
