//! The VM's life: Not started → Running ⇄ Paused → Shut down, with every
//! other move refused.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum VmState {
    NotStarted,
    Running,
    Paused,
    ShutDown,
}

impl VmState {
    /// The name Firecracker's InstanceInfo uses.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::NotStarted => "Not started",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::ShutDown => "Shut down",
        }
    }

    /// Move to `to`, or say why that move is not allowed.
    pub fn transition(&mut self, to: VmState) -> Result<(), StateError> {
        use VmState::*;
        let ok = matches!(
            (*self, to),
            (NotStarted, Running) | (Running, Paused) | (Paused, Running) | (Running | Paused, ShutDown)
        );
        if !ok {
            return Err(StateError { from: *self, to });
        }
        *self = to;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the microVM cannot go from {} to {}", .from.as_str(), .to.as_str())]
pub struct StateError {
    pub from: VmState,
    pub to: VmState,
}

#[cfg(test)]
mod tests {
    use super::VmState::*;
    use super::*;

    #[test]
    fn transitions() {
        let all = [NotStarted, Running, Paused, ShutDown];
        let allowed = [
            (NotStarted, Running),
            (Running, Paused),
            (Paused, Running),
            (Running, ShutDown),
            (Paused, ShutDown),
        ];
        for from in all {
            for to in all {
                let mut s = from;
                let r = s.transition(to);
                if allowed.contains(&(from, to)) {
                    assert_eq!((r, s), (Ok(()), to));
                } else {
                    assert!(r.is_err(), "{from:?} -> {to:?}");
                    assert_eq!(s, from, "a refused move leaves the state alone");
                }
            }
        }
        let e = Running.transition_err_text(NotStarted);
        assert!(e.contains("Running") && e.contains("Not started"), "{e}");
    }

    impl VmState {
        fn transition_err_text(mut self, to: VmState) -> String {
            self.transition(to).unwrap_err().to_string()
        }
    }
}
