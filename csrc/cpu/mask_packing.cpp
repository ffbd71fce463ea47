// CPU kernels of pack_mask / unpack_mask: 1 bit per scalar, bit (i % 8) of byte i / 8 is
// element i (little-endian bit order, trailing bits of the last byte zero).
#include "ops.h"

#include <torch/library.h>

#include <cstring>

#include "cpu_utils.h"

namespace calm_fast {
namespace cpu {
namespace {

// Eight 0/1 bytes (byte b at the lowest address = bit b) -> one packed byte. The multiply moves
// byte b's bit to bit 56 + b with no carries between the partial products.
CALM_CPU_INLINE uint8_t pack_bytes(uint64_t eight_bools) {
  return static_cast<uint8_t>((eight_bools * 0x0102040810204080ull) >> 56);
}

// One packed byte -> eight 0/1 bytes (bit b -> the byte at offset b).
CALM_CPU_INLINE uint64_t unpack_byte(uint8_t byte) {
  const uint64_t spread = (byte * 0x0101010101010101ull) & 0x8040201008040201ull;
  return ((spread + 0x7f7f7f7f7f7f7f7full) >> 7) & 0x0101010101010101ull;
}

void pack_bool_bytes(const uint8_t* __restrict mask, uint8_t* __restrict out, int64_t byte_begin,
                     int64_t byte_end) {
  for (int64_t j = byte_begin; j < byte_end; ++j) {
    uint64_t eight;
    std::memcpy(&eight, mask + 8 * j, 8);
    // torch bools are 0/1; normalize anyway so other nonzero bytes read as true.
    eight = (((eight & 0x7f7f7f7f7f7f7f7full) + 0x7f7f7f7f7f7f7f7full) | eight) >> 7;
    out[j] = pack_bytes(eight & 0x0101010101010101ull);
  }
}

template <typename T>
void pack_float_bytes(const typename T::storage* __restrict mask, uint8_t* __restrict out,
                      int64_t byte_begin, int64_t byte_end) {
#pragma omp simd
  for (int64_t j = byte_begin; j < byte_end; ++j) {
    uint32_t byte = 0;
    for (int b = 0; b < 8; ++b) byte |= uint32_t(T::load(mask[8 * j + b]) > 0.0f) << b;
    out[j] = static_cast<uint8_t>(byte);
  }
}

at::Tensor pack_mask_cpu(const at::Tensor& mask) {
  check_pack_mask(mask);
  const int64_t n = mask.numel();
  const int64_t full = n / 8;
  at::Tensor out = at::empty({packed_numel(n)}, mask.options().dtype(at::kByte));
  uint8_t* dst = out.data_ptr<uint8_t>();
  // Element i of the mask as a bit, for the last, partial byte.
  auto tail = [&](auto bit_of) {
    if (full == packed_numel(n)) return;
    uint8_t byte = 0;
    for (int64_t i = 8 * full; i < n; ++i) byte |= uint8_t(bit_of(i) << (i % 8));
    dst[full] = byte;
  };
  if (mask.scalar_type() == at::kBool) {
    const auto* src = static_cast<const uint8_t*>(mask.data_ptr());
    parallel_chunks(full, kGrain / 8, [&](int64_t begin, int64_t end) {
      pack_bool_bytes(src, dst, begin, end);
    });
    tail([&](int64_t i) { return int(src[i] != 0); });
    return out;
  }
  dispatch_float(mask.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto* src = data<T>(mask);
    parallel_chunks(full, kGrain / 8, [&](int64_t begin, int64_t end) {
      pack_float_bytes<T>(src, dst, begin, end);
    });
    tail([&](int64_t i) { return int(T::load(src[i]) > 0.0f); });
  });
  return out;
}

void unpack_bytes(const uint8_t* __restrict packed, uint8_t* __restrict out, int64_t byte_begin,
                  int64_t byte_end) {
  for (int64_t j = byte_begin; j < byte_end; ++j) {
    const uint64_t eight = unpack_byte(packed[j]);
    std::memcpy(out + 8 * j, &eight, 8);
  }
}

at::Tensor unpack_mask_cpu(const at::Tensor& packed, int64_t numel) {
  check_unpack_mask(packed, numel);
  at::Tensor out = at::empty({numel}, packed.options().dtype(at::kBool));
  const auto* src = packed.data_ptr<uint8_t>();
  auto* dst = static_cast<uint8_t*>(out.data_ptr());
  const int64_t full = numel / 8;
  parallel_chunks(full, kGrain / 8, [&](int64_t begin, int64_t end) {
    unpack_bytes(src, dst, begin, end);
  });
  for (int64_t i = 8 * full; i < numel; ++i) dst[i] = (src[full] >> (i % 8)) & 1;
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace calm_fast

TORCH_LIBRARY_IMPL(calm_fast, CPU, m) {
  m.impl("pack_mask", &calm_fast::cpu::pack_mask_cpu);
  m.impl("unpack_mask", &calm_fast::cpu::unpack_mask_cpu);
}
