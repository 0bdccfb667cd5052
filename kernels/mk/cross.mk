# mk/cross.mk — the pure-C parts cross-built for aarch64 (Jetson Orin, JetPack 6) and run under qemu-user
# (included last by kernels/Makefile: its rules' prerequisites expand BASEFLAGS, CPU_SRC, HEADERS, EDGE_C_SRC,
# EDGE_HEADERS from Makefile and mk/edge.mk when read).
#
#   make -C kernels cross-deps      install gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user, only those
#                                   missing (apt-get install -y; sudo when not root, like edge-deps)
#   make -C kernels cross-aarch64   $(BUILD)/aarch64/: static aarch64 executables pre_check (tools/pre_check.c +
#                                   the edge C sources), check_corpus and decode_dump (tools/check_corpus.c,
#                                   tools/decode_dump.c + the libnora_fast CPU sources + cuda_stub.c), plus
#                                   libnora_fast.so and libnora_edge_pre.so for aarch64
#   make -C kernels check-aarch64 [CASES=<file>] [CORPUS=<dir> NATIVE=<dir>]
#                                   run both drivers under qemu-aarch64: pre_check on CASES (without CASES only its
#                                   misuse checks), check_corpus on CORPUS (skipped, with a note, without CORPUS)
# Same "PASS|FAIL <check> <name> <count>" output as check-edge / check (formats in tools/pre_check.c, check_corpus.c).
# decode_dump writes nora_fast_decode_f64's actions, for a bitwise comparison with the host library
# (check_corpus allows 1e-6 against numpy, which an FMA-contracted iDCT would still pass).
# Static executables need no arm64 sysroot at run time (qemu-aarch64 without -L). Neither driver nor the library reads
# /proc/cpuinfo, getauxval or any CPU-feature probe (onnxruntime's cpuinfo does; that is not built here), so no fake
# ARM /proc/cpuinfo is needed. aarch64 has no __SSE2__, so resample.c compiles its portable loops (the ones
# EDGE_DEFS=-DNORA_EDGE_NO_SIMD selects on x86); resample_avx2.c is empty there (NE_HAVE_AVX2 is x86-only).
# CROSS_FP: the contraction flag. -ffp-contract=off keeps a*b+c as two rounded operations (no FMADD), so the float
# results equal x86 and numpy bit for bit. GCC's default is fast (fused) for the GNU dialects and off for -std=c11;
# CROSS_FP=-ffp-contract=fast (with its own BUILD dir) builds the fused variant for comparison.
CROSS_CC ?= aarch64-linux-gnu-gcc
CROSS_READELF ?= aarch64-linux-gnu-readelf
QEMU_AARCH64 ?= qemu-aarch64
CROSS_CFLAGS ?= -O2
CROSS_FP ?= -ffp-contract=off
CROSS_APT_PACKAGES := gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
CROSS_SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
CROSS_BUILD = $(BUILD)/aarch64
CROSS_BASEFLAGS = $(filter-out -ffp-contract=%,$(BASEFLAGS)) $(CROSS_FP)
CROSS_FAST_OBJ = $(CPU_SRC:src/%.c=$(CROSS_BUILD)/fast/%.o) $(CROSS_BUILD)/fast/cuda_stub.o
CROSS_EDGE_OBJ = $(EDGE_C_SRC:src/edge/%.c=$(CROSS_BUILD)/edge/%.o)
CROSS_OUT = $(CROSS_BUILD)/pre_check $(CROSS_BUILD)/check_corpus $(CROSS_BUILD)/decode_dump \
	$(CROSS_BUILD)/libnora_fast.so $(CROSS_BUILD)/libnora_edge_pre.so

.PHONY: cross-deps cross-aarch64 check-aarch64
cross-deps:
	dpkg -s $(CROSS_APT_PACKAGES) >/dev/null 2>&1 || ($(CROSS_SUDO) apt-get update -q && \
		$(CROSS_SUDO) apt-get install -y -q $(CROSS_APT_PACKAGES))

$(CROSS_BUILD)/fast/%.o: src/%.c $(HEADERS)
	@mkdir -p $(@D)
	$(CROSS_CC) $(CROSS_BASEFLAGS) $(CROSS_CFLAGS) -c $< -o $@

$(CROSS_BUILD)/edge/%.o: src/edge/%.c $(EDGE_HEADERS)
	@mkdir -p $(@D)
	$(CROSS_CC) $(CROSS_BASEFLAGS) $(CROSS_CFLAGS) $(EDGE_DEFS) -c $< -o $@

$(CROSS_BUILD)/libnora_fast.so: $(CROSS_FAST_OBJ)
	$(CROSS_CC) -shared -o $@ $^ $(LDLIBS)

$(CROSS_BUILD)/libnora_edge_pre.so: $(CROSS_EDGE_OBJ)
	$(CROSS_CC) -shared -o $@ $^ $(EDGE_LDLIBS)

$(CROSS_BUILD)/check_corpus: tools/check_corpus.c $(CROSS_FAST_OBJ) include/nora_fast.h
	$(CROSS_CC) -std=c11 $(WARN) $(CROSS_FP) $(CROSS_CFLAGS) -Iinclude -static $< $(filter %.o,$^) $(LDLIBS) -o $@

$(CROSS_BUILD)/decode_dump: tools/decode_dump.c $(CROSS_FAST_OBJ) include/nora_fast.h
	$(CROSS_CC) -std=c11 $(WARN) $(CROSS_FP) $(CROSS_CFLAGS) -Iinclude -static $< $(filter %.o,$^) $(LDLIBS) -o $@

$(CROSS_BUILD)/pre_check: tools/pre_check.c $(CROSS_EDGE_OBJ) include/nora_edge.h
	$(CROSS_CC) -std=c11 $(WARN) $(CROSS_FP) $(CROSS_CFLAGS) -Iinclude -static $< $(filter %.o,$^) $(EDGE_LDLIBS) \
		-o $@

# prints each output's ELF machine ("AArch64") so a host-compiler mix-up shows in the log
cross-aarch64: $(CROSS_OUT)
	@for f in $^; do printf '%s: ' $$f; $(CROSS_READELF) -h $$f | sed -n 's/^ *Machine: *//p'; done

check-aarch64: $(CROSS_BUILD)/pre_check $(CROSS_BUILD)/check_corpus
	$(QEMU_AARCH64) $(CROSS_BUILD)/pre_check $(CASES)
	$(if $(CORPUS),$(QEMU_AARCH64) $(CROSS_BUILD)/check_corpus $(CORPUS) $(NATIVE),\
		@echo "check_corpus not run: set CORPUS=<dir written by tests/kernels/corpus.py> (and NATIVE)")
