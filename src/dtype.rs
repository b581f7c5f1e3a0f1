//! Element types. `F32` is the compute type everywhere; `F64` is a CPU-only compute type used
//! as the high-precision reference (gradient checks); `F16` and `BF16` are storage types for
//! frozen weights; `U32`/`I32` hold indices (token ids, class labels, gather indices);
//! `Quant` is a frozen weight matrix kept in a quantised block format (`crate::quant`).

/// The element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
    U32,
    I32,
    /// A quantised `[rows, cols]` matrix (`crate::quant::QMatrix`): read by matmul (either
    /// operand order), embedding lookup and `to_dtype`; never a compute type.
    Quant(crate::quant::QFormat),
}

impl DType {
    /// Bytes per element (rounded up to 1 for quantised formats, which take a fraction of a
    /// byte: their size is `QMatrix::bytes`).
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F64 => 8,
            DType::F32 | DType::U32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Quant(_) => 1,
        }
    }

    /// Whether this is a quantised block format.
    pub fn is_quant(self) -> bool {
        matches!(self, DType::Quant(_))
    }

    /// The quantised format, if this is one.
    pub fn quant_format(self) -> Option<crate::quant::QFormat> {
        match self {
            DType::Quant(f) => Some(f),
            _ => None,
        }
    }

    /// Whether ops compute in this dtype (the others are storage or index types).
    pub fn is_compute(self) -> bool {
        matches!(self, DType::F32 | DType::F64)
    }

    /// Whether the dtype holds integers (indices).
    pub fn is_int(self) -> bool {
        matches!(self, DType::U32 | DType::I32)
    }

    /// Whether the dtype is a floating point type (compute or storage).
    pub fn is_float(self) -> bool {
        !self.is_int()
    }
}

/// The floating point types the kernels are generic over (f32 and f64).
pub trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::iter::Sum
    + Default
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const DTYPE: DType;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    /// `e^x` for hot loops: vectorisable, ≤ 2 ulp in f32 (see `backend::cpu::math`); f64 uses `exp`.
    fn exp_fast(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn erf(self) -> Self;
    fn abs(self) -> Self;
    fn powf(self, e: Self) -> Self;
    fn max(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    fn neg_infinity() -> Self;
    fn is_nan(self) -> bool;
}

macro_rules! impl_float {
    ($t:ty, $dt:expr, $erf:path, $exp_fast:path) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const DTYPE: DType = $dt;
            #[inline]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn exp_fast(self) -> Self {
                $exp_fast(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline]
            fn erf(self) -> Self {
                $erf(self)
            }
            #[inline]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline]
            fn powf(self, e: Self) -> Self {
                <$t>::powf(self, e)
            }
            #[inline]
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
            #[inline]
            fn min(self, o: Self) -> Self {
                <$t>::min(self, o)
            }
            #[inline]
            fn neg_infinity() -> Self {
                <$t>::NEG_INFINITY
            }
            #[inline]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
        }
    };
}
impl_float!(f32, DType::F32, libm::erff, crate::backend::cpu::math::exp_f32);
impl_float!(f64, DType::F64, libm::erf, f64::exp);
