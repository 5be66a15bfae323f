//! Fault injection for tests: makes a supervised source task panic on demand in a real running
//! agent, to prove that the supervisor restarts it, that the restart shows as a
//! `SourceRestarted` condition and in the `nodeward_task_*` metrics, and that the rest of the
//! agent keeps serving; and makes the load of a named eBPF program fail as a verifier
//! rejection would, to prove that `tcp.attribution = "auto"` falls back to the next path.
//!
//! Test code: this module exists only with the `fault-injection` cargo feature, which the
//! tests crate turns on (and `cargo xtask test` builds the binary with). A release build — the
//! RPM, the container image — leaves it off, so the shipped binary holds none of this, reads no
//! such variable, and cannot be made to fail this way by accident. With the feature it is
//! armed with
//!
//! ```text
//! NODEWARD_FAULT_INJECT=panic:<task>:<after_n_ticks>[:<backoff>][,<another>...]
//! NODEWARD_FAULT_INJECT=reject:<program>[,<another>...]
//! NODEWARD_FAULT_INJECT=delay:<task>:<duration>[,<another>...]
//! ```
//!
//! e.g. `panic:ebpf/tcp:5:5s`: the `ebpf/tcp` task panics once, after its source published 5
//! snapshots, and its supervisor waits 5 s (not its default 1 s) before the first restart, so
//! that a test has time to look at the agent while the task is down. Tasks: `ebpf/tcp`,
//! `ebpf/udp`, `gpu`, `cgroup`. Each panic fires once per process.
//!
//! `reject:nodeward_sock_create`: every load of that eBPF program (by its name in the object)
//! fails before the kernel is asked, every time, as a kernel whose verifier rejects it would.
//! Only the TCP source's programs consult it ([`reject`]).
//! `reject:nodeward_tcp_sockops/tag_at_listen` fails the sock_ops program only in its listen
//! tagging variant (the one the `sock_ops+listen_cb+cgroup_skb_egress` path loads).
//!
//! `delay:ebpf/tcp:15s`: the first run of the `ebpf/tcp` task waits 15 s before it runs, so
//! its first report comes that much later than the other sources' (a slow start-up seed); a
//! restarted run does not wait again.
//!
//! An armed fault is logged at WARN, and a spec that does not parse at ERROR (and nothing is
//! armed).

use std::{future::Future, time::Duration};

use tokio::sync::watch;

use crate::task::TaskError;

/// The environment variable read (with the `fault-injection` feature only).
pub const ENV: &str = "NODEWARD_FAULT_INJECT";

/// One injected fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The supervised task's name, e.g. `ebpf/tcp`.
    pub task: String,
    /// The task panics when its source has published this many snapshots (at least 1).
    pub after_ticks: u32,
    /// The supervisor's wait before the first restart, instead of the default.
    pub backoff: Option<Duration>,
}

/// One item of a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// `panic:<task>:<after_n_ticks>[:<backoff>]`.
    Panic(Fault),
    /// `reject:<program>`: loads of this eBPF program fail.
    Reject(String),
    /// `delay:<task>:<duration>`: the task's first run starts this much later.
    Delay(String, Duration),
}

/// Parses a spec (see the module's doc).
pub fn parse(spec: &str) -> Result<Vec<Spec>, String> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|one| {
            let bad = |why: &str| format!("{ENV}: `{one}`: {why}");
            let parts: Vec<&str> = one.split(':').collect();
            if let ["reject", program] = parts.as_slice() {
                if program.is_empty() {
                    return Err(bad("no program named"));
                }
                return Ok(Spec::Reject((*program).to_owned()));
            }
            if let ["delay", task, wait] = parts.as_slice() {
                if task.is_empty() {
                    return Err(bad("no task named"));
                }
                let wait =
                    humantime::parse_duration(wait).map_err(|e| bad(&format!("delay: {e}")))?;
                return Ok(Spec::Delay((*task).to_owned(), wait));
            }
            let (kind, task, after, backoff) = match parts.as_slice() {
                [kind, task, after] => (*kind, *task, *after, None),
                [kind, task, after, backoff] => (*kind, *task, *after, Some(*backoff)),
                _ => {
                    return Err(bad(
                        "expected panic:<task>:<after_n_ticks>[:<backoff>], reject:<program> \
                         or delay:<task>:<duration>",
                    ))
                }
            };
            if kind != "panic" {
                return Err(bad("the faults are `panic`, `reject` and `delay`"));
            }
            if task.is_empty() {
                return Err(bad("no task named"));
            }
            let after_ticks = after
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| bad("after_n_ticks must be a whole number ≥ 1"))?;
            let backoff = backoff
                .map(|b| humantime::parse_duration(b).map_err(|e| bad(&format!("backoff: {e}"))))
                .transpose()?;
            Ok(Spec::Panic(Fault {
                task: task.to_owned(),
                after_ticks,
                backoff,
            }))
        })
        .collect()
}

/// Whether loading eBPF program `program` may go ahead: with `reject:<program>` armed, an
/// error that stands in for the verifier's rejection. Called before the program is handed to
/// the kernel.
pub fn reject(program: &str) -> Result<(), String> {
    if armed::rejects().iter().any(|p| p == program) {
        return Err(format!(
            "rejected by fault injection ({ENV}=reject:{program}), standing in for the verifier"
        ));
    }
    Ok(())
}

/// The wait before the first restart of `task` that an armed fault asks for, if any; the
/// supervisor uses it instead of its default.
pub fn backoff(task: &str) -> Option<Duration> {
    armed::get()
        .iter()
        .find(|a| a.fault.task == task)
        .and_then(|a| a.fault.backoff)
}

/// Runs `run`, the body of supervised task `task`. With a fault armed for the task that has
/// not fired yet, the task panics (in its own task, as a bug in the source would, so that the
/// source is dropped and the supervisor sees a panic) once `ticks` has changed
/// `after_n_ticks` times. `ticks` is a fresh subscription to what the source publishes.
pub async fn inject<T, F>(
    task: &'static str,
    ticks: watch::Receiver<T>,
    run: F,
) -> Result<(), TaskError>
where
    F: Future<Output = Result<(), TaskError>>,
{
    if let Some(wait) = armed::take_delay(task) {
        tracing::warn!(
            task,
            ?wait,
            "fault injection: the task's first run waits ({ENV})"
        );
        tokio::time::sleep(wait).await;
    }
    if let Some(armed) = armed::get()
        .iter()
        .find(|a| a.fault.task == task && !a.fired())
    {
        return armed.run(task, ticks, run).await;
    }
    run.await
}

mod armed {
    use std::{
        future::Future,
        sync::{
            atomic::{AtomicBool, Ordering},
            OnceLock,
        },
    };

    use tokio::sync::watch;

    use super::{parse, Fault, Spec, ENV};
    use crate::task::TaskError;

    pub(super) struct Armed {
        pub(super) fault: Fault,
        fired: AtomicBool,
    }

    /// The spec in the environment, parsed once (and logged once).
    fn specs() -> &'static [Spec] {
        static SPECS: OnceLock<Vec<Spec>> = OnceLock::new();
        SPECS.get_or_init(|| {
            let Ok(spec) = std::env::var(ENV) else {
                return Vec::new();
            };
            match parse(&spec) {
                Ok(specs) => specs,
                Err(e) => {
                    tracing::error!(error = %e, "fault injection spec ignored");
                    Vec::new()
                }
            }
        })
    }

    /// The panics armed by the environment, read once.
    pub(super) fn get() -> &'static [Armed] {
        static ARMED: OnceLock<Vec<Armed>> = OnceLock::new();
        ARMED.get_or_init(|| {
            specs()
                .iter()
                .filter_map(|s| match s {
                    Spec::Panic(f) => Some(f.clone()),
                    Spec::Reject(_) | Spec::Delay(..) => None,
                })
                .map(|fault| {
                    tracing::warn!(task = %fault.task, after_ticks = fault.after_ticks, backoff = ?fault.backoff, "fault injection armed ({ENV}): the task will panic once");
                    Armed {
                        fault,
                        fired: AtomicBool::new(false),
                    }
                })
                .collect()
        })
    }

    /// The eBPF programs whose loads are made to fail, read once.
    pub(super) fn rejects() -> &'static [String] {
        static REJECTS: OnceLock<Vec<String>> = OnceLock::new();
        REJECTS.get_or_init(|| {
            specs()
                .iter()
                .filter_map(|s| match s {
                    Spec::Reject(p) => Some(p.clone()),
                    Spec::Panic(_) | Spec::Delay(..) => None,
                })
                .inspect(|program| {
                    tracing::warn!(%program, "fault injection armed ({ENV}): loads of this eBPF program will fail");
                })
                .collect()
        })
    }

    /// The wait armed for `task`'s first run, once: later calls (restarts) get `None`.
    pub(super) fn take_delay(task: &str) -> Option<std::time::Duration> {
        static TAKEN: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
        let wait = specs().iter().find_map(|s| match s {
            Spec::Delay(t, wait) if t == task => Some(*wait),
            _ => None,
        })?;
        let mut taken = TAKEN
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if taken.iter().any(|t| t == task) {
            return None;
        }
        taken.push(task.to_owned());
        Some(wait)
    }

    impl Armed {
        #[cfg(test)]
        pub(super) fn for_test(fault: Fault) -> Self {
            Self {
                fault,
                fired: AtomicBool::new(false),
            }
        }

        pub(super) fn fired(&self) -> bool {
            self.fired.load(Ordering::SeqCst)
        }

        pub(super) async fn run<T, F>(
            &self,
            task: &str,
            mut ticks: watch::Receiver<T>,
            run: F,
        ) -> Result<(), TaskError>
        where
            F: Future<Output = Result<(), TaskError>>,
        {
            let mut run = std::pin::pin!(run);
            let mut seen = 0u32;
            loop {
                tokio::select! {
                    result = &mut run => return result,
                    changed = ticks.changed() => {
                        if changed.is_err() {
                            return run.await;
                        }
                        seen += 1;
                        if seen >= self.fault.after_ticks && !self.fired.swap(true, Ordering::SeqCst) {
                            panic!("fault injected into {task} after {seen} ticks ({ENV})");
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_and_without_a_backoff_and_bad_ones_name_the_problem() {
        let faults = parse(
            "panic:ebpf/tcp:5:5s, panic:gpu:2,reject:nodeward_sock_create,delay:ebpf/tcp:15s",
        )
        .expect("valid");
        assert_eq!(
            faults,
            [
                Spec::Panic(Fault {
                    task: "ebpf/tcp".to_owned(),
                    after_ticks: 5,
                    backoff: Some(Duration::from_secs(5)),
                }),
                Spec::Panic(Fault {
                    task: "gpu".to_owned(),
                    after_ticks: 2,
                    backoff: None,
                }),
                Spec::Reject("nodeward_sock_create".to_owned()),
                Spec::Delay("ebpf/tcp".to_owned(), Duration::from_secs(15)),
            ]
        );
        for (spec, why) in [
            ("crash:gpu:1", "faults are"),
            ("reject:", "no program"),
            ("reject:a:b", "faults are"),
            ("panic:gpu", "expected"),
            ("panic:gpu:0", "≥ 1"),
            ("panic::3", "no task"),
            ("panic:gpu:3:soon", "backoff"),
            ("delay:ebpf/tcp:soon", "delay"),
            ("delay::1s", "no task"),
        ] {
            let e = parse(spec).expect_err(spec);
            assert!(e.contains(why) && e.contains(ENV), "{spec}: {e}");
        }
    }

    /// The variable is not set here: nothing is armed, and the hooks change nothing.
    #[tokio::test]
    async fn a_task_without_an_armed_fault_runs_unchanged_and_keeps_the_default_policy() {
        let (tx, rx) = watch::channel(0u32);
        let out = inject("no-such-task", rx, async move {
            for i in 1..=3 {
                tx.send_replace(i);
            }
            Err(TaskError::failed("its own error"))
        })
        .await;
        assert_eq!(
            out.map_err(|e| e.to_string()),
            Err("its own error".to_owned())
        );
        assert_eq!(backoff("no-such-task"), None);
        assert_eq!(reject("no_such_program"), Ok(()));
    }
}

/// The armed path, driven by the real supervisor.
#[cfg(test)]
mod armed_tests {
    use std::{
        sync::{
            atomic::{AtomicU32, Ordering},
            Arc,
        },
        time::Duration,
    };

    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    use super::{armed, Fault};
    use crate::supervise::{supervise, Policy, TaskHealth};

    #[tokio::test]
    async fn an_armed_fault_panics_once_after_its_ticks_and_the_restarted_task_runs_on() {
        let armed = armed::Armed::for_test(Fault {
            task: "t".to_owned(),
            after_ticks: 3,
            backoff: None,
        });
        let armed: &'static armed::Armed = Box::leak(Box::new(armed));
        let (tx, _) = watch::channel(0u32);
        let ticks = Arc::new(AtomicU32::new(0));
        let cancel = CancellationToken::new();
        let (htx, mut hrx) = watch::channel(TaskHealth::default());
        let policy = Policy {
            initial_backoff: Duration::from_millis(1),
            ..Policy::default()
        };
        let (t, c, tx2) = (ticks.clone(), cancel.clone(), tx.clone());
        let sup = tokio::spawn(supervise("t", policy, cancel.clone(), htx, move || {
            let (t, c, tx) = (t.clone(), c.clone(), tx2.clone());
            let rx = tx.subscribe();
            let body = async move {
                loop {
                    tokio::select! {
                        () = c.cancelled() => return Ok(()),
                        () = tokio::time::sleep(Duration::from_millis(1)) => {
                            tx.send_replace(t.fetch_add(1, Ordering::SeqCst) + 1);
                        }
                    }
                }
            };
            async move {
                if armed.fired() {
                    body.await
                } else {
                    armed.run("t", rx, body).await
                }
            }
        }));
        let h = hrx
            .wait_for(|h| h.restarts == 1)
            .await
            .expect("supervisor alive")
            .clone();
        assert_eq!(
            h.last_failure.as_deref(),
            Some("panicked: fault injected into t after 3 ticks (NODEWARD_FAULT_INJECT)")
        );
        // Ticks published faster than they are seen may be seen as one: at least three.
        assert!(
            ticks.load(Ordering::SeqCst) >= 3,
            "panicked at the third tick seen"
        );
        // The restarted task publishes on, and never panics again.
        while ticks.load(Ordering::SeqCst) < 20 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        cancel.cancel();
        assert!(sup.await.expect("supervisor").is_ok());
        assert_eq!(hrx.borrow().restarts, 1, "fired once");
    }
}
