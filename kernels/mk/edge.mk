# mk/edge.mk — libnora_edge, the firmware runtime (include/nora_edge.h; included by kernels/Makefile).
#
#   make -C kernels edge        $(BUILD)/libnora_edge_pre.so + $(BUILD)/libnora_edge_pre.a from $(EDGE_C_SRC)
#                               (C only for now: preprocessing + the last-error machinery; no external deps)
#   make -C kernels asan-edge CASES=<file>   tools/pre_check.c + the edge sources under AddressSanitizer + UBSan
#                               (-fno-sanitize-recover=all, leak check) run on a case list written by
#                               tests/kernels/test_edge_preprocess.py; without CASES only the misuse checks run
#   make -C kernels check-edge CASES=<file>  the same driver, optimised, no sanitizers ($(BUILD)/edge/pre_check)
# The driver prints "PASS|FAIL <check> <name> <count>" lines (format in tools/pre_check.c).
# EDGE_DEFS: extra -D flags for every edge object, e.g. EDGE_DEFS=-DNORA_EDGE_NO_SIMD builds the portable C loops
# instead of the SSE2 ones on x86 (what non-x86 targets such as Jetson's aarch64 run); use a separate BUILD dir.
# Extend EDGE_C_SRC (and later an EDGE_CXX_SRC) as the runtime grows; objects land in $(BUILD)/edge/.
EDGE_C_SRC := $(sort $(wildcard src/edge/*.c))
EDGE_HEADERS := include/nora_edge.h $(wildcard src/edge/*.h)
EDGE_OBJ := $(EDGE_C_SRC:src/edge/%.c=$(BUILD)/edge/%.o)
EDGE_ASAN_OBJ := $(EDGE_C_SRC:src/edge/%.c=$(BUILD)/edge-asan/%.o)
EDGE_LDLIBS := -lm
CASES ?=
EDGE_DEFS ?=

.PHONY: edge asan-edge check-edge
edge: $(BUILD)/libnora_edge_pre.so $(BUILD)/libnora_edge_pre.a

$(BUILD)/edge/%.o: src/edge/%.c $(EDGE_HEADERS)
	@mkdir -p $(@D)
	$(CC) $(BASEFLAGS) $(CFLAGS) $(EDGE_DEFS) -c $< -o $@

$(BUILD)/libnora_edge_pre.so: $(EDGE_OBJ)
	$(CC) -shared -o $@ $^ $(EDGE_LDLIBS)

$(BUILD)/libnora_edge_pre.a: $(EDGE_OBJ)
	rm -f $@ && ar rcs $@ $^

$(BUILD)/edge-asan/%.o: src/edge/%.c $(EDGE_HEADERS)
	@mkdir -p $(@D)
	$(CC) $(BASEFLAGS) $(ASAN_FLAGS) $(EDGE_DEFS) -c $< -o $@

$(BUILD)/edge-asan/pre_check: tools/pre_check.c $(EDGE_ASAN_OBJ) include/nora_edge.h
	$(CC) -std=c11 $(WARN) -ffp-contract=off $(ASAN_FLAGS) -Iinclude $< $(filter %.o,$^) $(EDGE_LDLIBS) -o $@

$(BUILD)/edge/pre_check: tools/pre_check.c $(BUILD)/libnora_edge_pre.a include/nora_edge.h
	$(CC) -std=c11 $(WARN) -ffp-contract=off $(CFLAGS) -Iinclude $< $(BUILD)/libnora_edge_pre.a $(EDGE_LDLIBS) -o $@

asan-edge: $(BUILD)/edge-asan/pre_check
	$(ASAN_ENV) $(BUILD)/edge-asan/pre_check $(CASES)

check-edge: $(BUILD)/edge/pre_check
	$(BUILD)/edge/pre_check $(CASES)
