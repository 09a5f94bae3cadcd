//! Exceptions raised while executing an instruction.

/// Exception vectors.
pub mod vector {
    pub const DE: u8 = 0;
    pub const DB: u8 = 1;
    pub const NMI: u8 = 2;
    pub const BP: u8 = 3;
    pub const OF: u8 = 4;
    pub const BR: u8 = 5;
    pub const UD: u8 = 6;
    pub const NM: u8 = 7;
    pub const DF: u8 = 8;
    pub const TS: u8 = 10;
    pub const NP: u8 = 11;
    pub const SS: u8 = 12;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const MF: u8 = 16;
    pub const AC: u8 = 17;
    pub const MC: u8 = 18;
    pub const XM: u8 = 19;
}

/// A fault or trap to deliver through the IDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// The faulting linear address for #PF, loaded into CR2 on delivery.
    pub cr2: Option<u64>,
}

impl Fault {
    pub const fn new(vector: u8) -> Self {
        Fault {
            vector,
            error_code: None,
            cr2: None,
        }
    }

    pub const fn with_code(vector: u8, code: u32) -> Self {
        Fault {
            vector,
            error_code: Some(code),
            cr2: None,
        }
    }

    pub const fn page(addr: u64, code: u32) -> Self {
        Fault {
            vector: vector::PF,
            error_code: Some(code),
            cr2: Some(addr),
        }
    }

    pub const fn ud() -> Self {
        Self::new(vector::UD)
    }

    pub const fn de() -> Self {
        Self::new(vector::DE)
    }

    pub const fn gp0() -> Self {
        Self::with_code(vector::GP, 0)
    }

    pub const fn gp(code: u32) -> Self {
        Self::with_code(vector::GP, code)
    }

    pub const fn ss0() -> Self {
        Self::with_code(vector::SS, 0)
    }

    pub const fn nm() -> Self {
        Self::new(vector::NM)
    }

    /// Contributory exceptions, for the double-fault rules.
    pub fn is_contributory(&self) -> bool {
        matches!(self.vector, 0 | 10 | 11 | 12 | 13)
    }

    /// Whether the vector pushes an error code when delivered as an exception.
    pub fn has_error_code(vector: u8) -> bool {
        matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21)
    }
}

/// Instruction-level result: `Err` is an exception to deliver.
pub type ExecResult<T = ()> = Result<T, Fault>;
