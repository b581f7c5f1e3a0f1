//! Shapes, strides and views. A `Layout` says how a logical n-d array sits in a flat storage:
//! element `[i0, i1, ..]` lives at `offset + Σ ik·strides[k]`. Views (transpose, narrow,
//! broadcast, reshape of contiguous data) only change the layout; the storage is shared.

use crate::error::{Error, Result};

/// Shape, element strides and start offset of a tensor inside its storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

/// Row-major strides of a contiguous array of this shape.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut acc = 1;
    for (s, &d) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        acc *= d;
    }
    strides
}

/// The shape two operands broadcast to (NumPy rules: align on the right, size 1 stretches).
pub fn broadcast_shapes(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(Error::ShapeMismatch { op, lhs: a.to_vec(), rhs: b.to_vec() }),
        };
    }
    Ok(out)
}

/// Resolve a possibly negative axis (`-1` = last) against a rank.
pub fn resolve_axis(op: &'static str, axis: isize, shape: &[usize]) -> Result<usize> {
    let rank = shape.len() as isize;
    let a = if axis < 0 { axis + rank } else { axis };
    if a < 0 || a >= rank {
        return Err(Error::AxisOutOfRange { op, axis, shape: shape.to_vec() });
    }
    Ok(a as usize)
}

impl Layout {
    /// A contiguous row-major layout starting at offset 0.
    pub fn contiguous(shape: &[usize]) -> Self {
        Layout { shape: shape.to_vec(), strides: contiguous_strides(shape), offset: 0 }
    }

    pub fn new(shape: Vec<usize>, strides: Vec<usize>, offset: usize) -> Self {
        debug_assert_eq!(shape.len(), strides.len());
        Layout { shape, strides, offset }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Row-major contiguous (size-1 dims may have any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut acc = 1;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != acc {
                return false;
            }
            acc *= d;
        }
        true
    }

    /// One past the largest storage index this layout can touch (0 when empty).
    pub fn storage_extent(&self) -> usize {
        if self.numel() == 0 {
            return 0;
        }
        self.offset + self.shape.iter().zip(&self.strides).map(|(&d, &s)| (d - 1) * s).sum::<usize>() + 1
    }

    /// Reorder the axes: result axis i is input axis `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Result<Layout> {
        let mut seen = vec![false; self.rank()];
        if perm.len() != self.rank() || perm.iter().any(|&p| p >= self.rank() || std::mem::replace(&mut seen[p], true)) {
            return Err(Error::Shape { op: "permute", msg: format!("{perm:?} is not a permutation of the axes of {:?}", self.shape) });
        }
        Ok(Layout {
            shape: perm.iter().map(|&p| self.shape[p]).collect(),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
            offset: self.offset,
        })
    }

    /// Swap two axes.
    pub fn transpose(&self, a: usize, b: usize) -> Result<Layout> {
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        if a >= self.rank() || b >= self.rank() {
            return Err(Error::AxisOutOfRange { op: "transpose", axis: a.max(b) as isize, shape: self.shape.clone() });
        }
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// Keep `len` entries of `axis` starting at `start`.
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Result<Layout> {
        if axis >= self.rank() {
            return Err(Error::AxisOutOfRange { op: "narrow", axis: axis as isize, shape: self.shape.clone() });
        }
        if start.checked_add(len).is_none_or(|end| end > self.shape[axis]) {
            return Err(Error::Shape {
                op: "narrow",
                msg: format!("range {start}..{start}+{len} outside axis {axis} of shape {:?}", self.shape),
            });
        }
        let mut l = self.clone();
        l.shape[axis] = len;
        if len > 0 {
            l.offset += start * self.strides[axis];
        }
        Ok(l)
    }

    /// View with the given shape where size-1 (or missing leading) axes are stretched by stride 0.
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Layout> {
        let err = || Error::ShapeMismatch { op: "broadcast_to", lhs: self.shape.clone(), rhs: shape.to_vec() };
        if shape.len() < self.rank() {
            return Err(err());
        }
        let extra = shape.len() - self.rank();
        let mut strides = vec![0; shape.len()];
        for i in 0..self.rank() {
            let (d, t) = (self.shape[i], shape[i + extra]);
            strides[i + extra] = if d == t {
                self.strides[i]
            } else if d == 1 {
                0
            } else {
                return Err(err());
            };
        }
        Ok(Layout { shape: shape.to_vec(), strides, offset: self.offset })
    }

    /// The layout of the elements that remain when `axis` is dropped (the outer index space
    /// of a reduction along that axis).
    pub fn without_axis(&self, axis: usize) -> Layout {
        let (mut shape, mut strides) = (self.shape.clone(), self.strides.clone());
        shape.remove(axis);
        strides.remove(axis);
        Layout { shape, strides, offset: self.offset }
    }

    /// A view with a new shape of the same element count, if the data allow it without a copy
    /// (always for contiguous data). `None` means the caller must copy first.
    pub fn reshape(&self, shape: &[usize]) -> Option<Layout> {
        if self.is_contiguous() {
            Some(Layout { shape: shape.to_vec(), strides: contiguous_strides(shape), offset: self.offset })
        } else {
            None
        }
    }

    /// Iterate over the storage index of every element in row-major logical order.
    pub fn offsets(&self) -> StridedOffsets<'_> {
        self.offsets_from(0)
    }

    /// Like `offsets`, starting at logical (row-major) element `start`.
    pub fn offsets_from(&self, start: usize) -> StridedOffsets<'_> {
        let numel = self.numel();
        let mut index = vec![0; self.rank()];
        let mut rem = start.min(numel);
        let mut off = self.offset;
        for i in (0..self.rank()).rev() {
            let d = self.shape[i].max(1);
            index[i] = rem % d;
            rem /= d;
            off += index[i] * self.strides[i];
        }
        StridedOffsets { layout: self, index, next: off, remaining: numel.saturating_sub(start) }
    }
}

/// Iterator over the storage offsets of a strided layout, row-major. Stepping costs O(1)
/// amortised: the innermost index is bumped and carries ripple outward.
pub struct StridedOffsets<'a> {
    layout: &'a Layout,
    index: Vec<usize>,
    next: usize,
    remaining: usize,
}

impl Iterator for StridedOffsets<'_> {
    type Item = usize;
    #[inline]
    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let cur = self.next;
        let (shape, strides) = (&self.layout.shape, &self.layout.strides);
        for i in (0..shape.len()).rev() {
            self.index[i] += 1;
            if self.index[i] < shape[i] {
                self.next += strides[i];
                break;
            }
            self.next -= (shape[i] - 1) * strides[i];
            self.index[i] = 0;
        }
        Some(cur)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for StridedOffsets<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_of_transposed_and_narrowed_views() {
        let l = Layout::contiguous(&[2, 3]).transpose(0, 1).unwrap();
        assert_eq!(l.offsets().collect::<Vec<_>>(), vec![0, 3, 1, 4, 2, 5]);
        let n = Layout::contiguous(&[3, 4]).narrow(1, 1, 2).unwrap();
        assert_eq!(n.offsets().collect::<Vec<_>>(), vec![1, 2, 5, 6, 9, 10]);
        assert_eq!(n.offsets_from(3).collect::<Vec<_>>(), vec![6, 9, 10]);
        let b = Layout::contiguous(&[3, 1]).broadcast_to(&[2, 3, 2]).unwrap();
        assert_eq!(b.offsets().collect::<Vec<_>>(), vec![0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn broadcast_rules() {
        assert_eq!(broadcast_shapes("t", &[3, 1, 5], &[4, 1]).unwrap(), vec![3, 4, 5]);
        assert!(broadcast_shapes("t", &[3, 2], &[4, 2]).is_err());
        assert_eq!(broadcast_shapes("t", &[], &[2]).unwrap(), vec![2]);
    }
}
