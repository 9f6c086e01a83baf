/* Stand-ins for the four LLVM NVPTX entry points that cubecl-llvm references, linked into the
 * GPU bundle only (benches/gpu.sh build). The offline LLVM 23 bundle this machine builds
 * against (PyPI mlc-llvm-static) has no NVPTX target, and emloc's `cuda` feature compiles
 * kernels with CubeCL's C++ backend through NVRTC, which never calls these. If one is called
 * anyway, say so and stop rather than compile garbage. */
#include <stdio.h>
#include <stdlib.h>

static void no_nvptx(const char *name) {
    fprintf(stderr,
            "emloc GPU bundle: %s was called, but this build has no LLVM NVPTX target "
            "(CubeCL's C++/NVRTC backend should compile the kernels)\n",
            name);
    abort();
}

void LLVMInitializeNVPTXTargetInfo(void) { no_nvptx(__func__); }
void LLVMInitializeNVPTXTarget(void) { no_nvptx(__func__); }
void LLVMInitializeNVPTXTargetMC(void) { no_nvptx(__func__); }
void LLVMInitializeNVPTXAsmPrinter(void) { no_nvptx(__func__); }
