# mk/runtime.mk — libnora_edge, the whole firmware runtime (include/nora_edge.h; included by kernels/Makefile).
#
#   make -C kernels runtime     $(BUILD)/libnora_edge.so + $(BUILD)/libnora_edge.a: preprocessing (mk/edge.mk's C
#                               objects), bundle reader, tokenizer, prompt, the policy object (src/edge/policy*.cpp,
#                               decode loops greedy.cpp / multitoken.cpp, draft table drafts.cpp),
#                               the onnxruntime layer (src/ort, onnxruntime dlopen'ed at run time) and libnora_fast's
#                               CPU objects. The .so exports nora_edge.h's symbols only (mk/libnora_edge.map) and
#                               needs libpcre2-8, libutf8proc, libstdc++ at run time; the .a needs the link line
#                               $(RUNTIME_LDLIBS) (C++ standard library included).
#   make -C kernels policy-check   tools/policy_check.cpp: runs a bundle on frames from a case file (the parity
#                               tests write it) and prints ids, classes and actions ($(BUILD)/runtime/policy_check)
# The Python runtime's preprocessing loads the dependency-free subset libnora_edge_pre.so (mk/edge.mk) instead.
RUNTIME_CXX_SRC := src/edge/policy.cpp src/edge/policy_step.cpp src/edge/greedy.cpp src/edge/multitoken.cpp \
  src/edge/drafts.cpp
RUNTIME_HEADERS := src/edge/policy_impl.h src/edge/decode.h src/edge/drafts.h $(BUNDLE_HEADERS) $(PROMPT_HEADERS) $(ORT_HDR) include/nora_fast.h
RUNTIME_CXXFLAGS = $(TOK_CXXFLAGS) -Isrc/ort -I$(ORT_INC)
RUNTIME_OBJ := $(RUNTIME_CXX_SRC:src/edge/%.cpp=$(BUILD)/runtime/%.o) $(BUILD)/runtime/ort_run.o
RUNTIME_ASAN_OBJ := $(RUNTIME_CXX_SRC:src/edge/%.cpp=$(BUILD)/runtime-asan/%.o) $(BUILD)/runtime-asan/ort_run.o
RUNTIME_ALL_OBJ = $(RUNTIME_OBJ) $(EDGE_OBJ) $(BUNDLE_OBJ) $(TOK_OBJ) $(PROMPT_OBJ) $(CPU_OBJ) $(BUILD)/cpu/cuda_stub.o
RUNTIME_LDLIBS := $(TOK_LDLIBS) -ldl -lm -lpthread

.PHONY: runtime policy-check policy-check-asan
runtime: $(BUILD)/libnora_edge.so $(BUILD)/libnora_edge.a

$(BUILD)/runtime/%.o: src/edge/%.cpp $(RUNTIME_HEADERS)
	@mkdir -p $(@D)
	$(CXX) $(RUNTIME_CXXFLAGS) $(CXXFLAGS) -O2 -c $< -o $@

$(BUILD)/runtime/ort_run.o: $(ORT_SRC) $(ORT_HDR)
	@mkdir -p $(@D)
	$(CC) $(BASEFLAGS) $(CFLAGS) -Isrc/ort -I$(ORT_INC) -c $< -o $@

$(BUILD)/libnora_edge.so: $(RUNTIME_ALL_OBJ) mk/libnora_edge.map
	$(CXX) -shared -Wl,--version-script=mk/libnora_edge.map -o $@ $(RUNTIME_ALL_OBJ) $(RUNTIME_LDLIBS)

$(BUILD)/libnora_edge.a: $(RUNTIME_ALL_OBJ)
	rm -f $@ && ar rcs $@ $^

$(BUILD)/runtime/policy_check: tools/policy_check.cpp $(BUILD)/libnora_edge.so include/nora_edge.h
	$(CXX) -std=c++17 $(WARN:-Wstrict-prototypes=) -Iinclude $(CXXFLAGS) -O2 $< -L$(BUILD) -lnora_edge \
	  -Wl,-rpath,$(abspath $(BUILD)) -o $@

$(BUILD)/runtime-asan/%.o: src/edge/%.cpp $(RUNTIME_HEADERS)
	@mkdir -p $(@D)
	$(CXX) $(RUNTIME_CXXFLAGS) $(ASAN_FLAGS) -c $< -o $@

$(BUILD)/runtime-asan/ort_run.o: $(ORT_SRC) $(ORT_HDR)
	@mkdir -p $(@D)
	$(CC) $(BASEFLAGS) $(ASAN_FLAGS) -Isrc/ort -I$(ORT_INC) -c $< -o $@

policy-check: $(BUILD)/runtime/policy_check

# the whole runtime under AddressSanitizer + UBSan, linked into examples/run_bundle.c (the tests run it on a bundle;
# onnxruntime itself is not instrumented: it is dlopen'ed, and LeakSanitizer reports only what our code allocated)
RUNTIME_ASAN_ALL_OBJ = $(RUNTIME_ASAN_OBJ) $(EDGE_ASAN_OBJ) $(BUNDLE_ASAN_OBJ) $(TOK_ASAN_OBJ) $(PROMPT_ASAN_OBJ) \
  $(BUILD)/asan/context.o $(BUILD)/asan/fast_cpu.o $(BUILD)/asan/cuda_stub.o
.PHONY: run-bundle-asan
$(BUILD)/runtime-asan/run_bundle: examples/run_bundle.c $(RUNTIME_ASAN_ALL_OBJ) include/nora_edge.h
	@mkdir -p $(@D)
	$(CC) -std=c11 $(ASAN_FLAGS) -Iinclude $(EXAMPLES_PNG_CFLAGS) -c $< -o $(BUILD)/runtime-asan/run_bundle.o
	$(CXX) $(ASAN_FLAGS) $(BUILD)/runtime-asan/run_bundle.o $(RUNTIME_ASAN_ALL_OBJ) $(RUNTIME_LDLIBS) \
	  $(EXAMPLES_PNG_LIBS) -o $@
run-bundle-asan: $(BUILD)/runtime-asan/run_bundle
