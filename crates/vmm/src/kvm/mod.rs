//! The `kvm` engine: the same machine with its vCPUs run by the host's KVM.
//!
//! - [`probe`] decides whether `/dev/kvm` can run ordinary guests (a PVM-type
//!   KVM, module `kvm_pvm`, cannot: it runs only PVM-aware guest kernels);
//! - [`vm::KvmVm`] creates the VM: guest memory from the machine's vm-memory
//!   regions, the in-kernel irqchip and PIT, CPUID, irqfd and ioeventfd;
//! - [`vcpu::KvmVcpu`] holds one vCPU: state in and out as x86emu's
//!   `CpuState` (see [`state`]) and one `KVM_RUN` at a time, with port and
//!   MMIO exits handed to an `x86emu::Bus`, the same buses `emu` uses;
//! - [`engine`] runs a machine's vCPUs, one thread each, with pause/resume.

pub mod cpuid;
pub mod engine;
pub mod irqchip_state;
pub mod state;
pub mod vcpu;
pub mod vm;

use std::path::Path;

/// Errors of the kvm engine.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("KVM cannot run this machine: {0}")]
    Unavailable(String),
    #[error("{what}: {err}")]
    Ioctl { what: &'static str, err: kvm_ioctls::Error },
    #[error("{0}")]
    Setup(String),
}

impl KvmError {
    pub(crate) fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
        move |err| KvmError::Ioctl { what, err }
    }
}

/// Why `/dev/kvm` cannot run ordinary guests here, or `Ok` when it can.
pub fn probe() -> Result<(), String> {
    probe_at(
        Path::new("/dev/kvm"),
        Path::new("/sys/module"),
        Path::new("/proc/cpuinfo"),
    )
}

/// [`probe`] with the paths as parameters (for tests).
pub fn probe_at(dev: &Path, sys_module: &Path, cpuinfo: &Path) -> Result<(), String> {
    if sys_module.join("kvm_pvm").exists() {
        return Err(
            "/dev/kvm is a PVM-type KVM (kernel module kvm_pvm), which runs only PVM-aware guest kernels".into(),
        );
    }
    if let Ok(info) = std::fs::read_to_string(cpuinfo) {
        let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or("");
        if !flags.split_whitespace().any(|f| f == "vmx" || f == "svm") {
            return Err("the CPU offers neither VMX nor SVM, so KVM cannot run ordinary guests".into());
        }
    }
    let path = std::ffi::CString::new(dev.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let kvm = kvm_ioctls::Kvm::new_with_path(&path).map_err(|e| format!("cannot open {}: {e}", dev.display()))?;
    if kvm.get_api_version() != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(format!(
            "{} has KVM API version {}",
            dev.display(),
            kvm.get_api_version()
        ));
    }
    use kvm_ioctls::Cap;
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel irqchip"),
        (Cap::Pit2, "in-kernel PIT"),
        (Cap::UserMemory, "user memory"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::ImmediateExit, "immediate exit"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(format!("{} lacks the {name} capability", dev.display()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_module_means_unusable() {
        let dir = std::env::temp_dir().join(format!("vessel-probe-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("module/kvm_pvm")).unwrap();
        let cpuinfo = dir.join("cpuinfo");
        std::fs::write(&cpuinfo, "flags\t\t: fpu svm lm\n").unwrap();
        let err = probe_at(Path::new("/dev/kvm"), &dir.join("module"), &cpuinfo).unwrap_err();
        assert!(err.contains("PVM"), "{err}");
        std::fs::remove_dir_all(dir.join("module/kvm_pvm")).unwrap();
        std::fs::write(&cpuinfo, "flags\t\t: fpu lm hypervisor\n").unwrap();
        let err = probe_at(Path::new("/dev/kvm"), &dir.join("module"), &cpuinfo).unwrap_err();
        assert!(err.contains("neither VMX nor SVM"), "{err}");
        std::fs::write(&cpuinfo, "flags\t\t: fpu svm\n").unwrap();
        let err = probe_at(&dir.join("no-such-kvm"), &dir.join("module"), &cpuinfo).unwrap_err();
        assert!(err.contains("cannot open"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn this_host() {
        // Whatever the answer, it is one line and does not panic.
        if let Err(why) = probe() {
            assert!(!why.contains('\n'));
        }
    }
}
