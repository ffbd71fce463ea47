// upload_words (declared in cuda_utils.cuh): a small host table -> a device int64 tensor, carried
// in kernel arguments, kUploadWords words per launch.
//
// Why not a copy: from pageable memory it synchronizes the host with the stream; from pinned
// memory the buffer must outlive every CUDA graph that captured the copy. Kernel arguments are
// copied at launch (and by value into a captured graph), so the op neither syncs nor leaves a
// host buffer behind, and is capturable.
#include "cuda_utils.cuh"

#include <cstring>

namespace calm_fast {
namespace cuda {
namespace {

constexpr int kUploadWords = 480;  // 3,840 bytes + the count: under the 4 KiB argument limit

struct UploadBatch {
  int64_t words[kUploadWords];
  int count;
};

__global__ void __launch_bounds__(kThreads) upload_words_kernel(const UploadBatch batch, int64_t* __restrict__ dst) {
  for (int i = threadIdx.x; i < batch.count; i += blockDim.x) dst[i] = batch.words[i];
}

}  // namespace

at::Tensor upload_words(const std::vector<int64_t>& words, const at::Device& device) {
  const int64_t n = static_cast<int64_t>(words.size());
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(device));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t begin = 0; begin < n; begin += kUploadWords) {
    UploadBatch batch;
    batch.count = static_cast<int>(std::min<int64_t>(kUploadWords, n - begin));
    std::memcpy(batch.words, words.data() + begin, sizeof(int64_t) * batch.count);
    upload_words_kernel<<<1, kThreads, 0, stream>>>(batch, out.data_ptr<int64_t>() + begin);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace cuda
}  // namespace calm_fast
