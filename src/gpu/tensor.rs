//! GPU tensors: a storage buffer with a shape and an element type.

use std::sync::Arc;

/// Element type of a tensor's storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit float (needs SHADER_F16 in kernels that read it).
    F16,
    /// 32-bit unsigned integer.
    U32,
    /// bfloat16 (stored as 16-bit words; kernels unpack with a shift, no shader feature needed).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// The order of the last axis's elements in each row of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KOrder {
    /// Row-major: element k at position k.
    #[default]
    Natural,
    /// Each run of 32 elements permuted into the order the tensor-core linear kernel builds its
    /// B fragments from ([`crate::ops::linear::frag_position`]): a linear layer's f16 weight
    /// `[N, K]` uploaded by [`crate::gpu::Gpu::upload_f16_frag`], K a multiple of 32.
    Frag32,
}

/// A buffer on the GPU with a row-major shape. Cloning shares the buffer.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub(crate) buffer: Arc<wgpu::Buffer>,
    shape: Vec<usize>,
    dtype: DType,
    /// Byte offset of the first element in the buffer (row-range views).
    offset: u64,
    /// The order of each row's elements ([`KOrder::Natural`] unless uploaded otherwise).
    k_order: KOrder,
}

impl Tensor {
    pub(crate) fn new(buffer: Arc<wgpu::Buffer>, shape: Vec<usize>, dtype: DType) -> Tensor {
        Tensor {
            buffer,
            shape,
            dtype,
            offset: 0,
            k_order: KOrder::Natural,
        }
    }

    /// The same tensor marked as holding its rows in `order` (the caller wrote them so).
    pub(crate) fn with_k_order(mut self, order: KOrder) -> Tensor {
        self.k_order = order;
        self
    }

    /// The order of each row's elements.
    pub fn k_order(&self) -> KOrder {
        self.k_order
    }

    /// Byte offset of this view in its buffer (0 for whole tensors).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// A view of rows `start .. start + count` of the first axis (same buffer, no copy).
    /// Kernels bind it as a buffer range, so the byte offset must be a multiple of the
    /// device's storage-offset alignment (256 bytes on most GPUs): true for row starts that
    /// are multiples of 64 of any 4-byte-aligned row.
    pub fn rows(&self, start: usize, count: usize) -> Option<Tensor> {
        let first = *self.shape.first()?;
        if start + count > first || count == 0 {
            return None;
        }
        let row_elems: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = count;
        Some(Tensor {
            buffer: self.buffer.clone(),
            shape,
            dtype: self.dtype,
            offset: self.offset + (start * row_elems) as u64 * self.dtype.size(),
            k_order: self.k_order,
        })
    }

    /// Buffer bytes for a shape, rounded up to 4 bytes as wgpu requires.
    pub(crate) fn byte_len(shape: &[usize], dtype: DType) -> u64 {
        let n: u64 = shape.iter().map(|&d| d as u64).product();
        (n * dtype.size()).div_ceil(4) * 4
    }

    /// Bytes the elements occupy (without padding).
    pub fn logical_bytes(&self) -> u64 {
        self.numel() as u64 * self.dtype.size()
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The underlying wgpu buffer.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// The same buffer seen with another shape of equal element count.
    pub fn reshape(&self, shape: &[usize]) -> Option<Tensor> {
        (shape.iter().product::<usize>() == self.numel()).then(|| Tensor {
            buffer: self.buffer.clone(),
            shape: shape.to_vec(),
            dtype: self.dtype,
            offset: self.offset,
            k_order: self.k_order,
        })
    }
}
