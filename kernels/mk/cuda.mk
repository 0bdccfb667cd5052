# mk/cuda.mk — the CUDA library, its CPU shim build, and the CUDA-vs-CPU check (included by kernels/Makefile).
#
#   make -C kernels cuda            $(BUILD)/libnora_fast_cuda.so: context.c + fast_cpu.c (CPU objects) + fast_cuda.cu
#                                   (nvcc: sm_87 + sm_90 cubins + compute_90 PTX, --fmad=false), linked to libcudart
#                                   (rpath'd); $(BUILD)/cuda_archs.txt lists the cubins/PTX found in the object
#   make -C kernels shim            $(BUILD)/libnora_fast_shim.so: fast_cuda.cu compiled by $(CXX) for the CPU behind
#                                   src/cuda_shim.h (sequential thread-index loop, host memory as "device" memory)
#   make -C kernels gpu-check       build tools/gpu_check.c against the CUDA library and run it on $(GPU_CHECK_NATIVE)
#   make -C kernels gpu-check-shim  the same program against the shim library (CPU dry run, no GPU needed)
#
# Toolkits and drivers. The cubins/PTX built here come from CUDA 13 (this machine's nvcc). JetPack 6 (Jetson Orin,
# sm_87) ships CUDA 12.6: a CUDA 13 PTX needs a CUDA 13 driver to JIT, and the sm_87 cubin needs a driver that
# accepts code built by CUDA 13. On JetPack 6 rebuild with its own toolkit:
#   NVCC=/usr/local/cuda-12.6/bin/nvcc make -C kernels cuda
# (cudart is found from the nvcc install: $(CUDA_HOME)/lib64 or $(CUDA_HOME)/targets/<arch>/lib.)
# --fmad=false: no fused multiply-add in device code, so the float64 iDCT rounds exactly like the CPU path
# (-ffp-contract=off) and like numpy.

CXX ?= g++
GPU_CHECK_NATIVE ?= testdata/native
GPU_CHECK_ARGS ?=
# the toolkit root as nvcc itself reports it (nvcc may be a wrapper script outside the toolkit)
ifeq ($(origin CUDA_HOME),undefined)
NF_NVCC_TOP = $(shell cd /tmp && $(NVCC) -dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^\#\$$ TOP=//p')
CUDA_HOME := $(if $(NVCC),$(realpath $(NF_NVCC_TOP)))
endif
ifeq ($(origin CUDA_LIBDIR),undefined)
CUDA_LIBDIR := $(if $(CUDA_HOME),$(patsubst %/,%,$(dir $(firstword $(wildcard $(CUDA_HOME)/lib64/libcudart.so \
                                                   $(CUDA_HOME)/targets/*/lib/libcudart.so)))))
endif
ifeq ($(origin CUOBJDUMP),undefined)
CUOBJDUMP := $(firstword $(if $(CUDA_HOME),$(wildcard $(CUDA_HOME)/bin/cuobjdump)) \
                         $(shell command -v cuobjdump 2>/dev/null))
endif

CUDA_GENCODE := -gencode arch=compute_87,code=sm_87 -gencode arch=compute_90,code=sm_90 \
                -gencode arch=compute_90,code=compute_90
NVCCFLAGS ?= -O2
# warnings are errors here (nvcc 13 + g++ 12 build clean); NVCC_WARN= relaxes it for another toolkit's headers
NVCC_WARN ?= -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror
NVCC_BASE := -std=c++17 --fmad=false $(CUDA_GENCODE) -Iinclude -Isrc \
             -Xcompiler -fPIC,-fvisibility=hidden,-ffp-contract=off $(NVCC_WARN)
SHIM_FLAGS := -x c++ -std=c++17 -DNORA_CUDA_SHIM -fPIC -fvisibility=hidden -ffp-contract=off -Wall -Wextra -Werror \
              -Wshadow -Iinclude -Isrc
CUDA_HEADERS := $(HEADERS) src/cuda_shim.h

.PHONY: gpu-check-shim

# ---- CUDA library ----------------------------------------------------------------------------------------------
cuda: $(BUILD)/libnora_fast_cuda.so $(BUILD)/cuda_archs.txt

$(BUILD)/cuda/fast_cuda.o: src/fast_cuda.cu $(CUDA_HEADERS)
	@test -n "$(NVCC)" || { echo "nvcc not found: set NVCC=/path/to/nvcc" >&2; exit 1; }
	@mkdir -p $(@D)
	$(NVCC) $(NVCC_BASE) $(NVCCFLAGS) -c $< -o $@

$(BUILD)/libnora_fast_cuda.so: $(CPU_OBJ) $(BUILD)/cuda/fast_cuda.o
	@test -n "$(CUDA_LIBDIR)" || { echo "libcudart.so not found under CUDA_HOME=$(CUDA_HOME)" >&2; exit 1; }
	$(CXX) -shared -o $@ $^ -L$(CUDA_LIBDIR) -Wl,-rpath,$(CUDA_LIBDIR) -lcudart $(LDLIBS)

# What the object carries: cuobjdump where it exists, else the fat binary's own entry headers (kind, sm version),
# read from the .nv_fatbin section; lines in cuobjdump's form ("ELF file 1: ...sm_87.cubin", "PTX file 1: ...").
define NF_FATBIN_PY
import struct, sys
data, pos, count = open(sys.argv[1], "rb").read(), 0, {1: 0, 2: 0}
while pos + 16 <= len(data):
    magic, _, head, size = struct.unpack_from("<IHHQ", data, pos)
    if magic != 0xBA55ED50:
        break
    entry, end = pos + head, pos + head + size
    while entry + 0x20 <= end:
        kind, _, ehead, esize = struct.unpack_from("<HHIQ", data, entry)
        arch = struct.unpack_from("<I", data, entry + 0x1C)[0]
        if kind in count:
            count[kind] += 1
            what = ("ELF", "cubin") if kind == 2 else ("PTX", "ptx")
            print("%s file %4d: fast_cuda.%d.sm_%d.%s" % (what[0], count[kind], count[kind], arch, what[1]))
        entry += ehead + esize
    pos = end
endef
export NF_FATBIN_PY

$(BUILD)/cuda_archs.txt: $(BUILD)/cuda/fast_cuda.o
ifneq ($(CUOBJDUMP),)
	$(CUOBJDUMP) --list-elf --list-ptx $< > $@
else
	objcopy -O binary --only-section=.nv_fatbin $< $(BUILD)/cuda/fast_cuda.fatbin
	python3 -c "$$NF_FATBIN_PY" $(BUILD)/cuda/fast_cuda.fatbin > $@
endif
	@cat $@

# ---- CPU shim --------------------------------------------------------------------------------------------------
shim: $(BUILD)/libnora_fast_shim.so

$(BUILD)/shim/fast_cuda.o: src/fast_cuda.cu $(CUDA_HEADERS)
	@mkdir -p $(@D)
	$(CXX) $(SHIM_FLAGS) $(CFLAGS) -c $< -o $@

$(BUILD)/libnora_fast_shim.so: $(CPU_OBJ) $(BUILD)/shim/fast_cuda.o
	$(CXX) -shared -o $@ $^ $(LDLIBS)

# ---- CUDA vs CPU check -----------------------------------------------------------------------------------------
GPU_CHECK_FLAGS := -std=c11 $(WARN) -ffp-contract=off -Iinclude -Isrc

$(BUILD)/gpu_check: tools/gpu_check.c $(BUILD)/libnora_fast_cuda.so $(CUDA_HEADERS)
	$(CC) $(GPU_CHECK_FLAGS) $(CFLAGS) -isystem $(CUDA_HOME)/include $< -o $@ \
	  -L$(BUILD) -Wl,-rpath,$(abspath $(BUILD)) -lnora_fast_cuda -L$(CUDA_LIBDIR) -Wl,-rpath,$(CUDA_LIBDIR) -lcudart \
	  $(LDLIBS)

$(BUILD)/gpu_check_shim: tools/gpu_check.c $(BUILD)/libnora_fast_shim.so $(CUDA_HEADERS)
	$(CC) $(GPU_CHECK_FLAGS) -DNORA_CUDA_SHIM $(CFLAGS) $< -o $@ \
	  -L$(BUILD) -Wl,-rpath,$(abspath $(BUILD)) -lnora_fast_shim $(LDLIBS)

gpu-check: $(BUILD)/gpu_check
	$(BUILD)/gpu_check $(GPU_CHECK_NATIVE) $(GPU_CHECK_ARGS)

gpu-check-shim: $(BUILD)/gpu_check_shim
	$(BUILD)/gpu_check_shim $(GPU_CHECK_NATIVE) $(GPU_CHECK_ARGS)
