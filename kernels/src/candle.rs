//! The candle side: weights held in the kernels' layout as a `QTensor` (so `QMatMul` runs these
//! kernels unchanged), and the row-by-row path for candle's batch-sensitive kernel.

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor, QuantizedType};
use candle_core::{CpuStorage, Module, Result, Tensor};
use half::f16;

use std::borrow::Cow;

use crate::blocks::{Block, BlockQ5_0, BlockQ8_0, QK};
use crate::cpu::{isa, Isa};

/// Weights held for candle in the kernels' layout (`Block::Packed`): a `QTensor` whose matmul
/// runs these kernels. Its bytes (`QTensor::data`) are that layout, not GGUF's.
pub struct FastBlocks<B: Block> {
    packed: Vec<B::Packed>,
    /// Values per row.
    k: usize,
    isa: Isa,
}

impl<B: Block> FastBlocks<B> {
    /// Raw GGUF bytes of a matrix with rows of `k` values, packed.
    pub fn from_bytes(data: &[u8], k: usize) -> Result<Self> {
        let size = std::mem::size_of::<B>();
        let row = k / QK * size;
        if k == 0 || k % QK != 0 || data.len() % row != 0 {
            candle_core::bail!(
                "{} bytes are not whole rows of {k} {:?} values",
                data.len(),
                B::DTYPE
            );
        }
        let mut blocks = Vec::<B>::with_capacity(data.len() / size);
        // SAFETY: B is a plain `repr(C)` struct of integers (any bit pattern is valid); the
        // capacity holds data.len() bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                blocks.as_mut_ptr() as *mut u8,
                data.len(),
            );
            blocks.set_len(data.len() / size);
        }
        Ok(Self {
            packed: B::pack(blocks, k / QK),
            k,
            isa: isa(),
        })
    }

    /// The weights as the kernels read them.
    pub fn packed(&self) -> &[B::Packed] {
        &self.packed
    }

    fn per_row(&self) -> usize {
        B::packed_len(self.k / QK)
    }

    /// Dequantises rows `ids` (an embedding lookup).
    pub fn rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let (k, per_row) = (self.k, self.per_row());
        let rows = self.packed.len() / per_row;
        let mut out = vec![0f32; ids.len() * k];
        for (o, &id) in out.chunks_exact_mut(k).zip(ids) {
            let id = id as usize;
            if id >= rows {
                candle_core::bail!("token id {id} is out of range for {rows} rows");
            }
            B::unpack(&self.packed[id * per_row..(id + 1) * per_row], o);
        }
        Ok(out)
    }
}

impl<B: Block> QuantizedType for FastBlocks<B> {
    fn dtype(&self) -> GgmlDType {
        B::DTYPE
    }

    fn matmul_t(&self, mkn: (usize, usize, usize), lhs: &[f32], dst: &mut [f32]) -> Result<()> {
        B::matmul_packed(self.isa, mkn, lhs, &self.packed, dst)
    }

    fn matmul_t_f16(&self, _: (usize, usize, usize), _: &[f16], _: &mut [f16]) -> Result<()> {
        candle_core::bail!("f16 activations are not supported by moss's kernels")
    }

    fn embedding(&self, ids: &[u32], _rows: usize, hidden: usize) -> Result<CpuStorage> {
        if hidden != self.k {
            candle_core::bail!("an embedding of {hidden} values from rows of {}", self.k);
        }
        Ok(CpuStorage::F32(self.rows(ids)?))
    }

    fn dequantize(&self, elem_count: usize) -> Result<CpuStorage> {
        let mut out = vec![0f32; elem_count];
        for (row, o) in self
            .packed
            .chunks(self.per_row())
            .zip(out.chunks_mut(self.k))
        {
            B::unpack(row, o);
        }
        Ok(CpuStorage::F32(out))
    }

    fn storage_size_in_bytes(&self) -> usize {
        self.packed.len() * std::mem::size_of::<B::Packed>()
    }

    fn as_ptr(&self) -> *const u8 {
        self.packed.as_ptr() as *const u8
    }

    fn block_size(&self) -> usize {
        QK
    }

    fn from_float(&mut self, xs: &[f32]) {
        let mut blocks = vec![B::default(); xs.len() / QK];
        B::quantize(xs, &mut blocks);
        self.packed = B::pack(blocks, self.k / QK);
    }

    fn from_float_imatrix(&mut self, xs: &[f32], _: &[f32], _: usize) {
        self.from_float(xs)
    }

    fn size(&self) -> usize {
        self.storage_size_in_bytes()
    }
}

/// The same tensor with its blocks in moss's kernels when its type has them (CPU only);
/// otherwise the tensor unchanged.
pub fn accelerate(t: QTensor) -> Result<QTensor> {
    if !t.device().is_cpu() {
        return Ok(t);
    }
    let k = *t.shape().dims().last().unwrap_or(&0);
    let storage: Box<dyn QuantizedType> = match t.dtype() {
        GgmlDType::Q5_0 => Box::new(FastBlocks::<BlockQ5_0>::from_bytes(&data(&t)?, k)?),
        GgmlDType::Q8_0 if isa() != Isa::Scalar => {
            Box::new(FastBlocks::<BlockQ8_0>::from_bytes(&data(&t)?, k)?)
        }
        _ => return Ok(t),
    };
    QTensor::new(QStorage::Cpu(storage), t.shape().clone())
}

/// Whether candle's kernel for `dtype` sums one row differently from several rows multiplied at
/// once, so that a sequence decoded in a batch (or with drafted tokens) would not get what it gets
/// alone: on x86-64 candle 0.11 multiplies a lone Q6_K row with its compact GEMV and two or more
/// with repacked tiles; unquantized matrices (F32, F16, BF16) become plain products, which `gemm`
/// computes for one row as a matrix-vector product and for several with its tiled kernel.
/// `tests/kernels.rs` checks that every other type is indifferent.
pub fn batch_sensitive(dtype: GgmlDType) -> bool {
    match dtype {
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => true,
        GgmlDType::Q6K => cfg!(target_arch = "x86_64"),
        _ => false,
    }
}

/// `mm.forward(x)` one row of `x` at a time (rows: every dimension but the last): each row takes
/// the one-row path, as it would alone.
pub fn forward_rows(mm: &QMatMul, x: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let k = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / k.max(1);
    if rows <= 1 {
        return mm.forward(x);
    }
    let flat = x.reshape((rows, k))?.contiguous()?;
    let outs = (0..rows)
        .map(|i| mm.forward(&flat.narrow(0, i, 1)?))
        .collect::<Result<Vec<_>>>()?;
    let y = Tensor::cat(&outs, 0)?;
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("rows > 1") = y.dim(1)?;
    y.reshape(shape)
}

fn data(t: &QTensor) -> Result<Cow<'_, [u8]>> {
    t.data()
}
