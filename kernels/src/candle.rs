//! The candle side: a weight matrix as the decoder multiplies it (`Matrix`): held in the kernels'
//! layout as a `QTensor` (for embedding lookups, sizes and dequantising) and, sharing the same
//! memory, as a product the decoder calls directly; and the row-by-row path for candle's
//! batch-sensitive kernels.
//!
//! moss's products do not go through `QMatMul`: on x86 candle 0.11 sends Q4_K, Q6_K and Q8_0
//! matrices of some shapes (rows a multiple of 16, columns of 256) to repacked kernels of its own,
//! chosen by the type's name and reading the storage's bytes as GGUF lays them out, which moss's
//! Q8_0 pairs are not. (candle's repacked kernels are good: Q4_K and Q6_K stay with them, and so
//! do the Q8_0 shapes they take.)

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor, QuantizedType};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};
use half::f16;

use std::sync::Arc;

use crate::blocks::{Block, BlockQ5_0, BlockQ8_0, QK};
use crate::cpu::{isa, Isa};

/// Weights in the kernels' layout (`Block::Packed`); its bytes (`QTensor::data`) are that
/// layout, not GGUF's. Clones share the weights.
#[derive(Clone)]
pub struct FastBlocks<B: Block> {
    packed: Arc<Vec<B::Packed>>,
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
            packed: Arc::new(B::pack(blocks, k / QK)),
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
        self.packed = Arc::new(B::pack(blocks, self.k / QK));
    }

    fn from_float_imatrix(&mut self, xs: &[f32], _: &[f32], _: usize) {
        self.from_float(xs)
    }

    fn size(&self) -> usize {
        self.storage_size_in_bytes()
    }
}

/// A weight matrix as the decoder multiplies it: by moss's kernels where they take its type,
/// else by candle's `QMatMul`, whose batch-sensitive kernels go one row at a time in decoding
/// steps (so that a sequence's token comes out the same alone and in a batch).
#[derive(Clone)]
pub struct Matrix {
    /// The matrix as candle holds it (in moss's layout where `product` is set).
    mm: QMatMul,
    product: Option<Product>,
    /// candle's kernel for the type sums a lone row differently from several.
    row_by_row: bool,
}

impl Matrix {
    pub fn new(t: QTensor) -> Result<Self> {
        let cpu = t.device().is_cpu();
        let row_by_row = cpu && batch_sensitive(t.dtype());
        let (t, product) = if cpu { accelerate(t)? } else { (t, None) };
        Ok(Self {
            mm: QMatMul::from_qtensor(t)?,
            product,
            row_by_row,
        })
    }

    /// `x` times the matrix's transpose; `decoding`: the rows are sequences' next tokens (one
    /// each), which must come out as each would alone.
    pub fn forward(&self, x: &Tensor, decoding: bool) -> Result<Tensor> {
        match &self.product {
            Some(p) => p.forward(x),
            None if decoding && self.row_by_row => forward_rows(&self.mm, x),
            None => self.mm.forward(x),
        }
    }

    /// Whether moss's kernels multiply by it (else candle's).
    pub fn in_moss_kernels(&self) -> bool {
        self.product.is_some()
    }

    /// The matrix as candle holds it (embedding lookups; on a GPU, candle's kernels).
    pub fn qmatmul(&self) -> &QMatMul {
        &self.mm
    }

    /// Bytes of the matrix as held (what one pass over it reads).
    pub fn bytes(&self) -> usize {
        match &self.mm {
            QMatMul::QTensor(t) => t.storage_size_in_bytes(),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        }
    }
}

/// The same tensor with its blocks in moss's kernels when its type has them, and the product to
/// multiply by (`None`: the tensor unchanged, for candle's `QMatMul`).
fn accelerate(t: QTensor) -> Result<(QTensor, Option<Product>)> {
    let k = *t.shape().dims().last().unwrap_or(&0);
    let n = t.shape().elem_count() / k.max(1);
    fn both<B: Block>(t: &QTensor, k: usize) -> Result<(Box<dyn QuantizedType>, Product)> {
        let fast = FastBlocks::<B>::from_bytes(&t.data()?, k)?;
        let n = fast.packed.len() / fast.per_row();
        let product = Product {
            blocks: Arc::new(fast.clone()),
            n,
            k,
        };
        Ok((Box::new(fast), product))
    }
    let (storage, product) = match t.dtype() {
        GgmlDType::Q5_0 => both::<BlockQ5_0>(&t, k)?,
        GgmlDType::Q8_0 if isa() != Isa::Scalar && !candle_tiles_q8_0(n, k) => {
            both::<BlockQ8_0>(&t, k)?
        }
        _ => return Ok((t, None)),
    };
    let shape = t.shape().clone();
    Ok((QTensor::new(QStorage::Cpu(storage), shape)?, Some(product)))
}

/// Whether candle 0.11 multiplies a Q8_0 matrix of `n` rows of `k` values with its repacked VNNI
/// tiles (x86 with AVX-512 VNNI or AVX-VNNI, rows of whole 256-value blocks, a multiple of 16
/// rows), which measured faster than moss's kernel for every batch size (`cargo bench --bench
/// kernels -- --only Q8_0`: 896 × 4864, one row, 48 µs against 88): such matrices stay candle's.
fn candle_tiles_q8_0(n: usize, k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let vnni = (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni"))
            || is_x86_feature_detected!("avxvnni");
        vnni && k % 256 == 0 && n % 16 == 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (n, k);
        false
    }
}

/// A matrix in moss's kernels, multiplied by directly: `x` (f32, rows of `k`) times its
/// transpose (`n` rows), as `QMatMul::forward` would.
#[derive(Clone)]
struct Product {
    blocks: Arc<dyn QuantizedType>,
    n: usize,
    k: usize,
}

impl Product {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for Product {
    fn name(&self) -> &'static str {
        "moss-kernels-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = (self.n, self.k);
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("moss's kernels take f32 activations");
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("moss's kernels take contiguous activations");
        };
        let mut dims = l.shape().dims().to_vec();
        if dims.last() != Some(&k) {
            candle_core::bail!("activations of shape {dims:?} against rows of {k} values");
        }
        let x = &data[start..end];
        let m = x.len() / k.max(1);
        *dims.last_mut().expect("checked above") = n;
        let mut dst = vec![0f32; m * n];
        self.blocks.matmul_t((m, k, n), x, &mut dst)?;
        Ok((CpuStorage::F32(dst), Shape::from(dims)))
    }
}

/// Whether candle's CPU kernel for `dtype` sums one row differently from several rows multiplied
/// at once, so that a sequence decoded in a batch (or with drafted tokens) would not get what it
/// gets alone: on x86-64 candle 0.11 multiplies a lone Q6_K row with its compact GEMV and two or
/// more with repacked tiles; unquantized matrices (F32, F16, BF16) become plain products, which
/// `gemm` computes for one row as a matrix-vector product and for several with its tiled kernel.
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
