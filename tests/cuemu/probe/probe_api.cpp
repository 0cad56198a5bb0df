// C entry point of the probe kernels (ctypes, no pybind11: keeps this test build small).
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>

void probe_run(const std::string& name, uint64_t out, unsigned blocks, unsigned threads);

extern "C" __attribute__((visibility("default"))) int cuemu_probe(const char* name, uint64_t out, unsigned blocks,
                                                                  unsigned threads, char* error, size_t error_size) {
  try {
    probe_run(name, out, blocks, threads);
    return 0;
  } catch (const std::exception& e) {
    std::strncpy(error, e.what(), error_size - 1);
    error[error_size - 1] = '\0';
    return 1;
  }
}
