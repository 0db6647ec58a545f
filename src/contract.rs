//! The contract of each Hermes generation hermes-mgr serves: what its dispatcher gives a
//! worker and how it books the worker's end, one question per method, each answered as that
//! version's own code does (proven against it, run, in `tests/it/parity.rs`). Pure: which
//! Hermes is installed is `spawn::installed`'s to find.

/// The worker contract a version gets: the newest proven one at or below it (0.21, never
/// run here, gets 0.20.1's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Generation {
    /// 0.19.0's `_default_spawn`.
    V019,
    /// 0.20.1's: 0.19.0's, plus `HERMES_SESSION_SOURCE=kanban`, `--provider` with `-m`,
    /// `--reasoning`, and a review lane that keeps the task's own skills.
    V020,
    /// ~0.22's: 0.20.1's, plus `HERMES_REAL_HOME` and the worker's pid fingerprint, and no
    /// `-Q` in goal mode.
    V022,
}

impl Generation {
    /// The proven version whose contract this is, as `doctor` and the journal name it.
    pub fn version(self) -> &'static str {
        match self {
            Generation::V019 => "0.19.0",
            Generation::V020 => "0.20.1",
            Generation::V022 => "0.22.2",
        }
    }

    /// `HERMES_SESSION_SOURCE=kanban`: the worker's session is tagged a kanban one.
    pub fn session_source(self) -> bool {
        self >= Generation::V020
    }

    /// `HERMES_REAL_HOME`: the user's real home, named to the worker.
    pub fn real_home(self) -> bool {
        self >= Generation::V022
    }

    /// The task's `provider_override` (`--provider`, with `-m`) and `reasoning_effort`
    /// (`--reasoning`) reach the worker's argv.
    pub fn provider_and_reasoning(self) -> bool {
        self >= Generation::V020
    }

    /// Goal mode runs the worker fully quiet (`-Q`).
    pub fn goal_quiet(self) -> bool {
        self < Generation::V022
    }

    /// The review lane adds `sdlc-review` to the task's skills (0.19.0 replaces them).
    pub fn review_keeps_skills(self) -> bool {
        self >= Generation::V020
    }

    /// The worker's pid fingerprint (`worker_started_at`) is recorded at its start.
    pub fn fingerprint(self) -> bool {
        self >= Generation::V022
    }

    /// Exit 78 (`KANBAN_TERMINAL_PROVIDER_EXIT_CODE`) is a terminal provider error, blocked
    /// at once, sticky; before 0.22 it is one more exit code.
    pub fn terminal_provider_exit(self) -> bool {
        self >= Generation::V022
    }

    /// Each end's payload (and run metadata) says which status the task goes back to
    /// (`retry_status`: `review` for a review-lane run), and the task goes back there.
    pub fn retry_status(self) -> bool {
        self >= Generation::V020
    }

    /// A breaker trip by a policy of its own (the protocol-violation budget, exit 78) is
    /// marked `sticky` on its `gave_up`, and stays blocked whatever the counter says.
    pub fn sticky_trips(self) -> bool {
        self >= Generation::V022
    }

    /// The error a clean exit without a verdict is booked with (a retry's worker reads it as
    /// its prior attempt's), as this version words it.
    pub fn protocol_violation_error(self) -> &'static str {
        match self {
            Generation::V019 | Generation::V020 => {
                "worker exited cleanly (rc=0) without calling kanban_complete or kanban_block — protocol violation. If the prior run already did the work, verify it and report the result via kanban_complete; a run that ends without a terminal kanban call counts as failed no matter what it did."
            }
            Generation::V022 => {
                "worker exited cleanly (rc=0) without kanban_complete, kanban_block or kanban_request_review — protocol violation. If the prior run already did the work, verify it and report it via kanban_complete (or kanban_request_review); a run without a terminal kanban call counts as failed no matter what it did."
            }
        }
    }

    /// A dead worker's end carries its last output (`worker_output`, in the payload and
    /// after the error).
    pub fn worker_output(self) -> bool {
        self >= Generation::V022
    }

    /// `kanban.max_in_progress` caps the running tasks of every board together (and has a
    /// default derived from memory), not those of each board.
    pub fn host_wide_max_in_progress(self) -> bool {
        self >= Generation::V022
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What each contract gives a worker, as each version's `_default_spawn` and review lane
    /// do (proven against them, run, in `tests/it/parity.rs`).
    #[test]
    fn each_generation_gives_what_its_version_gives() {
        use Generation::*;
        let rows = [
            // (generation, session source, real home, provider+reasoning, -Q, review keeps
            // skills, fingerprint, host-wide max_in_progress)
            (V019, false, false, false, true, false, false, false),
            (V020, true, false, true, true, true, false, false),
            (V022, true, true, true, false, true, true, true),
        ];
        for (g, ss, rh, pr, q, rk, fp, hw) in rows {
            assert_eq!(
                (
                    g.session_source(),
                    g.real_home(),
                    g.provider_and_reasoning(),
                    g.goal_quiet(),
                    g.review_keeps_skills(),
                    g.fingerprint(),
                    g.host_wide_max_in_progress()
                ),
                (ss, rh, pr, q, rk, fp, hw),
                "{g:?}"
            );
        }
        assert_eq!(
            [V019, V020, V022].map(Generation::version),
            ["0.19.0", "0.20.1", "0.22.2"]
        );
    }
}
