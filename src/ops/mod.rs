//! Numerical operations with a CPU reference path; the CUDA twins (kernels/*.cu) join them under
//! the `cuda` feature and are tested against these references.

pub mod attention;
#[cfg(feature = "cuda")]
pub mod bert_fused;
#[cfg(feature = "cuda")]
pub mod llama_fused;
pub mod paged_attention;
pub mod qmatmul;
pub mod rng;
pub mod sampling;
pub mod similarity;
#[cfg(feature = "cuda")]
pub mod similarity_variants;

/// Result type of the ops layer.
pub type Result<T> = std::result::Result<T, crate::error::OpsError>;

/// A CUDA driver error as an ops error.
#[cfg(feature = "cuda")]
pub(crate) fn dev_err(e: impl std::fmt::Display) -> crate::error::OpsError {
    crate::error::OpsError::Device(e.to_string())
}

/// The CUDA device `t` lives on; `what` names it in the error when it is elsewhere.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_device(
    t: &candle_core::Tensor,
    what: &str,
) -> Result<candle_core::cuda_backend::CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => Err(crate::error::OpsError::Device(format!(
            "{what} is not on a CUDA device"
        ))),
    }
}

/// A device buffer of `shape` as a tensor (the outputs of our kernels).
#[cfg(feature = "cuda")]
pub(crate) fn wrap_cuda<T: candle_core::cuda_backend::CudaDType>(
    dev: &candle_core::cuda_backend::CudaDevice,
    out: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    shape: (usize, usize),
) -> candle_core::Tensor {
    let storage = candle_core::Storage::Cuda(
        candle_core::cuda_backend::CudaStorage::wrap_cuda_slice(out, dev.clone()),
    );
    candle_core::Tensor::from_storage(storage, shape, candle_core::op::BackpropOp::none(), false)
}

/// The device's multiprocessors, which the kernels' grids are sized against.
#[cfg(feature = "cuda")]
pub(crate) fn multiprocessors(dev: &candle_core::cuda_backend::CudaDevice) -> Result<u32> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    let sms = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(dev_err)?;
    Ok(sms.max(1) as u32)
}

/// Whether the device's stream-ordered memory pool keeps freed memory (`keep`) or hands it back
/// to the driver at every synchronisation (the driver's default). Kept, a forward pass reuses
/// the buffers of the last one instead of mapping fresh memory each time; the pool grows to the
/// largest working set seen. A no-op on the CPU.
#[cfg(feature = "cuda")]
pub fn keep_freed_memory(dev: &candle_core::Device, keep: bool) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let candle_core::Device::Cuda(d) = dev else {
        return Ok(());
    };
    let mut threshold: u64 = if keep { u64::MAX } else { 0 };
    // SAFETY: the device handle comes from a live context; the release threshold attribute
    // takes a u64, which `threshold` is.
    unsafe {
        let pool = result::device::get_default_mem_pool(d.cuda_stream().context().cu_device())
            .map_err(dev_err)?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .map_err(dev_err)
    }
}

/// Whether cudarc gives every device buffer two CUDA events (its default), to order the buffer's
/// uses across streams. This process drives each device through candle's one stream and
/// creates no other, so those events are never waited on or recorded; off, an allocation costs
/// one driver call instead of three and a free likewise, on every tensor of every step. A
/// no-op on the CPU.
#[cfg(feature = "cuda")]
pub fn track_buffer_events(dev: &candle_core::Device, on: bool) {
    if let candle_core::Device::Cuda(d) = dev {
        let ctx = d.cuda_stream().context().clone();
        // SAFETY: the events order uses across streams; every buffer of this process is used
        // on the device's one stream (candle's), in issue order, so none is needed.
        unsafe {
            if on {
                ctx.enable_event_tracking();
            } else {
                ctx.disable_event_tracking();
            }
        }
    }
}

/// A raw output pointer shared by the tasks of one parallel op, each writing its own disjoint
/// elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: every op that shares one writes disjoint elements from its tasks and waits for all of
// them before the buffer is read.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
