# mk/prompt.mk — libnora_edge's prompt assembly and mrope positions (src/edge/prompt.{h,cpp}; C++17; included by
# kernels/Makefile after mk/tokenizer.mk, whose TOK_* variables and object rules it reuses).
#
#   make -C kernels prompt-check       $(BUILD)/prompt/prompt_check: tools/prompt_check.cpp + prompt.cpp + the
#                                      tokenizer objects ($(TOK_OBJ)), optimised
#   make -C kernels prompt-check-asan  the same under AddressSanitizer + UBSan ($(BUILD)/prompt-asan/prompt_check)
# Driver: prompt_check TOKENIZER_JSON CASES_FILE -> one JSON line or `ERR <status> <message>` per case (format in
# tools/prompt_check.cpp). PROMPT_CXX_SRC / PROMPT_OBJ are what libnora_edge will link next to $(TOK_OBJ).
PROMPT_CXX_SRC := src/edge/prompt.cpp
PROMPT_HEADERS := src/edge/prompt.h $(TOK_HEADERS)
PROMPT_OBJ := $(PROMPT_CXX_SRC:src/edge/%.cpp=$(BUILD)/prompt/%.o)
PROMPT_ASAN_OBJ := $(PROMPT_CXX_SRC:src/edge/%.cpp=$(BUILD)/prompt-asan/%.o)

.PHONY: prompt-check prompt-check-asan

$(BUILD)/prompt/%.o: src/edge/%.cpp $(PROMPT_HEADERS)
	@mkdir -p $(@D)
	$(CXX) $(TOK_CXXFLAGS) $(CXXFLAGS) -O2 -c $< -o $@

$(BUILD)/prompt/prompt_check: tools/prompt_check.cpp $(PROMPT_OBJ) $(TOK_OBJ) $(PROMPT_HEADERS)
	$(CXX) $(TOK_CXXFLAGS) $(CXXFLAGS) -O2 $< $(PROMPT_OBJ) $(TOK_OBJ) $(TOK_LDLIBS) -o $@

$(BUILD)/prompt-asan/%.o: src/edge/%.cpp $(PROMPT_HEADERS)
	@mkdir -p $(@D)
	$(CXX) $(TOK_CXXFLAGS) $(ASAN_FLAGS) -c $< -o $@

$(BUILD)/prompt-asan/prompt_check: tools/prompt_check.cpp $(PROMPT_ASAN_OBJ) $(TOK_ASAN_OBJ) $(PROMPT_HEADERS)
	$(CXX) $(TOK_CXXFLAGS) $(ASAN_FLAGS) $< $(PROMPT_ASAN_OBJ) $(TOK_ASAN_OBJ) $(TOK_LDLIBS) -o $@

prompt-check: $(BUILD)/prompt/prompt_check
prompt-check-asan: $(BUILD)/prompt-asan/prompt_check
