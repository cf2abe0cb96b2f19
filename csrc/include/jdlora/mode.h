// Process-wide execution modes, read by the launchers at every launch.
//
// Batch-invariant mode: the launchers fix every decision that sets the order
// in which a token's sums are formed (on CUDA the split of d_in, cluster or
// not) from the weights' shapes alone, never from the number of tokens or
// the GPU's multiprocessor count, so that one token's output is bitwise the
// same whatever else is in the batch. A process-wide setting rather than an
// op argument: the op schemas (and every integration that calls them) stay
// as they are, torch.compile sees no new input, and a CUDA graph keeps the
// decisions of the mode in effect when it was captured. Initial value:
// JDLORA_BATCH_INVARIANT=1 in the environment.
#pragma once

#include <atomic>
#include <cstdlib>

namespace jdlora {

inline std::atomic<bool>& batch_invariant_flag() {
  static std::atomic<bool> flag{[] {
    const char* v = std::getenv("JDLORA_BATCH_INVARIANT");
    return v != nullptr && v[0] != '\0' && !(v[0] == '0' && v[1] == '\0');
  }()};
  return flag;
}

inline bool batch_invariant() { return batch_invariant_flag().load(std::memory_order_relaxed); }

inline void set_batch_invariant(bool on) { batch_invariant_flag().store(on, std::memory_order_relaxed); }

}  // namespace jdlora
