# mk/tokenizer.mk — the byte-level BPE tokenizer of libnora_edge (src/edge/tokenizer*.{h,cpp}; C++17).
# TOK_CXX_SRC / TOK_OBJ are what libnora_edge links (with $(TOK_LDLIBS)) once the C ABI wraps the tokenizer.
#
#   make -C kernels edge-deps   install the Debian packages it builds against, only those missing
#                               (apt-get install -y; sudo when not root, like the root Makefile)
#   make -C kernels tok-check   $(BUILD)/tok/tok_check: tools/tok_check.cpp + the tokenizer, optimised
#   make -C kernels tok-check-asan  the same driver under AddressSanitizer + UBSan ($(BUILD)/tok-asan/tok_check)
# Driver: tok_check TOKENIZER_JSON STRINGS_FILE -> one line per input line (format in tools/tok_check.cpp).
# Packages: libpcre2-dev (Qwen2's split regex, Unicode 14 tables in Debian 12's 10.42), libutf8proc-dev (NFC),
# nlohmann-json3-dev (header-only JSON parser for tokenizer.json).
EDGE_APT_PACKAGES := libpcre2-dev libutf8proc-dev nlohmann-json3-dev
EDGE_SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
CXX ?= g++
TOK_CXXFLAGS := -std=c++17 -fPIC -fvisibility=hidden -ffp-contract=off -Wall -Wextra -Werror -Wshadow \
	-Iinclude -Isrc $(shell pkg-config --cflags libpcre2-8 libutf8proc 2>/dev/null)
TOK_LDLIBS := -lpcre2-8 -lutf8proc
TOK_HEADERS := src/edge/tokenizer.h src/edge/tokenizer_impl.h include/nora_edge.h
TOK_CXX_SRC := src/edge/tokenizer.cpp src/edge/tokenizer_load.cpp
TOK_OBJ := $(TOK_CXX_SRC:src/edge/%.cpp=$(BUILD)/tok/%.o)
TOK_ASAN_OBJ := $(TOK_CXX_SRC:src/edge/%.cpp=$(BUILD)/tok-asan/%.o)

.PHONY: edge-deps tok-check tok-check-asan
edge-deps:
	dpkg -s $(EDGE_APT_PACKAGES) >/dev/null 2>&1 || ($(EDGE_SUDO) apt-get update -q && \
		$(EDGE_SUDO) apt-get install -y -q $(EDGE_APT_PACKAGES))

$(BUILD)/tok/%.o: src/edge/%.cpp $(TOK_HEADERS)
	@mkdir -p $(@D)
	$(CXX) $(TOK_CXXFLAGS) $(CXXFLAGS) -O2 -c $< -o $@

$(BUILD)/tok/tok_check: tools/tok_check.cpp $(TOK_OBJ) $(TOK_HEADERS)
	$(CXX) $(TOK_CXXFLAGS) $(CXXFLAGS) -O2 $< $(TOK_OBJ) $(TOK_LDLIBS) -o $@

$(BUILD)/tok-asan/%.o: src/edge/%.cpp $(TOK_HEADERS)
	@mkdir -p $(@D)
	$(CXX) $(TOK_CXXFLAGS) $(ASAN_FLAGS) -c $< -o $@

$(BUILD)/tok-asan/tok_check: tools/tok_check.cpp $(TOK_ASAN_OBJ) $(TOK_HEADERS)
	$(CXX) $(TOK_CXXFLAGS) $(ASAN_FLAGS) $< $(TOK_ASAN_OBJ) $(TOK_LDLIBS) -o $@

tok-check: $(BUILD)/tok/tok_check
tok-check-asan: $(BUILD)/tok-asan/tok_check
