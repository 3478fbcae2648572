// The emulated devices' controls (tests/cuda_emu/cuda_runtime.h), for tests/test_cuda_emulated.py:
// the device table, the calling thread's device and dry-run mode, and what the launchers did (their
// launches on this thread, every cudaFuncSetAttribute). Included once by each emulation library.
#pragma once
#include "cuda_runtime.h"

// Device `index` (the table grows to hold it): compute capability major, opt-in shared memory per
// block, SMs, grid limits.
extern "C" void emu_set_device(int index, int cc_major, int optin, int sms, int64_t max_x, int64_t max_y,
                               int64_t max_z) {
  const std::lock_guard<std::mutex> lock(emu::state_mutex);
  if (index >= static_cast<int>(emu::devices.size())) emu::devices.resize(static_cast<size_t>(index) + 1);
  emu::Device& d = emu::devices[static_cast<size_t>(index)];
  d.cc_major = cc_major;
  d.optin = optin;
  d.sms = sms;
  d.max_grid[0] = max_x;
  d.max_grid[1] = max_y;
  d.max_grid[2] = max_z;
}

// The calling thread's current device (cudaSetDevice) and whether its launches only get checked and recorded.
extern "C" void emu_use_device(int index) { emu::current_device = index; }
extern "C" void emu_set_dry_run(int on) { emu::dry_run = on != 0; }

// The calling thread's launches since the last call (then forgotten), at most `capacity` of them, 7
// numbers each: kernel id, device, grid x, y, z, threads, dynamic shared memory. Returns their count.
extern "C" int emu_launches(int64_t* out, int capacity) {
  const int n = static_cast<int>(emu::launches.size());
  for (int i = 0; i < n && i < capacity; ++i) {
    const emu::LaunchRecord& r = emu::launches[static_cast<size_t>(i)];
    const int64_t row[7] = {static_cast<int64_t>(reinterpret_cast<uintptr_t>(r.kernel)), r.device, r.grid.x, r.grid.y,
                            r.grid.z, r.block.x, static_cast<int64_t>(r.smem)};
    std::memcpy(out + 7 * i, row, sizeof(row));
  }
  emu::launches.clear();
  return n;
}

// Every cudaFuncSetAttribute so far, from any thread, in order (at most `capacity`), 4 numbers each:
// kernel id, device, attribute, value. Returns their count.
extern "C" int emu_attribute_calls(int64_t* out, int capacity) {
  const std::lock_guard<std::mutex> lock(emu::state_mutex);
  const int n = static_cast<int>(emu::attribute_calls.size());
  for (int i = 0; i < n && i < capacity; ++i) {
    const emu::AttributeCall& c = emu::attribute_calls[static_cast<size_t>(i)];
    const int64_t row[4] = {static_cast<int64_t>(reinterpret_cast<uintptr_t>(c.kernel)), c.device, c.attribute,
                            c.value};
    std::memcpy(out + 4 * i, row, sizeof(row));
  }
  return n;
}
