//! SSE arithmetic on the host's own SSE unit, for x86-64 hosts.
//!
//! With every MXCSR exception masked (the state Linux and every C runtime
//! run in), the guest's ADD/SUB/MUL/DIV/SQRT on single or double values
//! give exactly what the host's instruction gives under the guest's
//! rounding mode, DAZ and FTZ: same bits, same flags. Running the host
//! instruction with the guest's MXCSR loaded is then both exact and about
//! a hundred times cheaper than the software float path (`float.rs`),
//! which stays the reference, the path for unmasked exceptions (where
//! x86's underflow rule and the untouched destination need care) and the
//! path on other hosts.

use std::arch::asm;
use std::arch::x86_64::__m128i;

use super::mx;

/// The masks of all six exceptions.
pub(crate) const ALL_MASKED: u32 = mx::FLAGS << mx::MASK_SHIFT;

/// A binary SSE operation run on the host: (destination, source, guest
/// MXCSR) -> (result, flags raised).
pub(crate) type HostOp = fn(u128, u128, u32) -> (u128, u32);

macro_rules! host_ops {
    ($($name:ident => $ins:literal),* $(,)?) => {$(
        /// The host instruction of the same name, run with the guest's
        /// MXCSR controls (exceptions all masked; flags cleared first).
        pub(crate) fn $name(a: u128, b: u128, mxcsr: u32) -> (u128, u32) {
            // Keep only the bits LDMXCSR accepts, clear the flags, mask
            // every exception so the host never traps.
            let mut guest_csr: u32 = (mxcsr & mx::WRITABLE & !mx::FLAGS) | ALL_MASKED;
            let mut host_csr: u32 = 0;
            // SAFETY: u128 and __m128i are both 16 plain bytes.
            let mut x: __m128i = unsafe { std::mem::transmute::<u128, __m128i>(a) };
            // SAFETY: as above.
            let y: __m128i = unsafe { std::mem::transmute::<u128, __m128i>(b) };
            // SAFETY: saves the host MXCSR, loads a valid MXCSR (reserved
            // bits clear, all exceptions masked, so the operation cannot
            // trap), runs one SSE arithmetic instruction on two registers,
            // reads the flags it raised, and restores the host MXCSR before
            // any other code runs. Both pointers are to live locals.
            unsafe {
                asm!(
                    "stmxcsr [{host}]",
                    "ldmxcsr [{guest}]",
                    concat!($ins, " {x}, {y}"),
                    "stmxcsr [{guest}]",
                    "ldmxcsr [{host}]",
                    host = in(reg) &mut host_csr,
                    guest = in(reg) &mut guest_csr,
                    x = inout(xmm_reg) x,
                    y = in(xmm_reg) y,
                    options(nostack),
                );
            }
            // SAFETY: as above.
            (unsafe { std::mem::transmute::<__m128i, u128>(x) }, guest_csr & mx::FLAGS)
        }
    )*};
}

host_ops!(
    addps => "addps", addpd => "addpd", addss => "addss", addsd => "addsd",
    subps => "subps", subpd => "subpd", subss => "subss", subsd => "subsd",
    mulps => "mulps", mulpd => "mulpd", mulss => "mulss", mulsd => "mulsd",
    divps => "divps", divpd => "divpd", divss => "divss", divsd => "divsd",
    sqrtps => "sqrtps", sqrtpd => "sqrtpd", sqrtss => "sqrtss", sqrtsd => "sqrtsd",
);
