//! Flag computation shared by all instruction classes.

use iced_x86::ConditionCode;

use crate::state::flags::*;

/// PF: set when the low byte has an even number of one bits.
#[inline(always)]
pub fn parity(v: u64) -> u64 {
    if (v as u8).count_ones().is_multiple_of(2) {
        PF
    } else {
        0
    }
}

/// Sign bit of a `size`-byte value.
#[inline(always)]
pub fn sign_bit(size: u32) -> u64 {
    1u64 << (size * 8 - 1)
}

/// ZF, SF and PF of a result of `size` bytes (the result must be masked).
#[inline(always)]
pub fn szp(result: u64, size: u32) -> u64 {
    let mut f = parity(result);
    if result == 0 {
        f |= ZF;
    }
    if result & sign_bit(size) != 0 {
        f |= SF;
    }
    f
}

/// Evaluate a condition code against RFLAGS.
#[inline(always)]
pub fn condition(cc: ConditionCode, rflags: u64) -> bool {
    let cf = rflags & CF != 0;
    let zf = rflags & ZF != 0;
    let sf = rflags & SF != 0;
    let of = rflags & OF != 0;
    let pf = rflags & PF != 0;
    match cc {
        ConditionCode::None => true,
        ConditionCode::o => of,
        ConditionCode::no => !of,
        ConditionCode::b => cf,
        ConditionCode::ae => !cf,
        ConditionCode::e => zf,
        ConditionCode::ne => !zf,
        ConditionCode::be => cf || zf,
        ConditionCode::a => !cf && !zf,
        ConditionCode::s => sf,
        ConditionCode::ns => !sf,
        ConditionCode::p => pf,
        ConditionCode::np => !pf,
        ConditionCode::l => sf != of,
        ConditionCode::ge => sf == of,
        ConditionCode::le => zf || sf != of,
        ConditionCode::g => !zf && sf == of,
    }
}

/// Replace the status flags in `rflags` with `new` (only the STATUS bits of
/// `new` are used).
#[inline(always)]
pub fn set_status(rflags: &mut u64, new: u64) {
    *rflags = (*rflags & !STATUS) | (new & STATUS);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parity_and_szp() {
        assert_eq!(parity(0), PF);
        assert_eq!(parity(1), 0);
        assert_eq!(parity(0x103), PF); // only the low byte counts
        assert_eq!(szp(0, 4), ZF | PF);
        assert_eq!(szp(0x80, 1), SF);
        assert_eq!(szp(0x80, 2), 0);
    }

    #[test]
    fn conditions() {
        assert!(condition(ConditionCode::l, SF));
        assert!(!condition(ConditionCode::l, SF | OF));
        assert!(condition(ConditionCode::be, ZF));
        assert!(condition(ConditionCode::g, 0));
    }
}
