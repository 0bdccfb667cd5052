# mk/bundle.mk — libnora_edge's bundle reader (src/edge/bundle.{h,cpp}, bundle_impl.h, bundle_image.cpp,
# npy.cpp; C++17 over nlohmann-json) and its SHA-256 (src/edge/sha256.c, also compiled into libnora_edge by
# mk/edge.mk). Included by kernels/Makefile.
# BUNDLE_CXX_SRC / BUNDLE_OBJ are what libnora_edge links once the C ABI's policy object wraps the reader
# (BundleError's status -> nora_edge_priv_fail).
#
#   make -C kernels bundle-check        $(BUILD)/bundle/bundle_check: tools/bundle_check.cpp + the reader, optimised
#   make -C kernels bundle-check-asan   the same under AddressSanitizer + UBSan ($(BUILD)/bundle-asan/bundle_check)
# Driver: bundle_check [--hash] DIR [--rows ID...] | --sha256 FILE... | --half-table (format in the tool).
BUNDLE_CXXFLAGS := -std=c++17 -fPIC -fvisibility=hidden -ffp-contract=off -Wall -Wextra -Werror -Wshadow \
	-Iinclude -Isrc
BUNDLE_HEADERS := src/edge/bundle.h src/edge/bundle_impl.h src/edge/sha256.h src/edge/edge_error.h \
	include/nora_edge.h
BUNDLE_CXX_SRC := src/edge/bundle.cpp src/edge/bundle_image.cpp src/edge/npy.cpp
BUNDLE_OBJ := $(BUNDLE_CXX_SRC:src/edge/%.cpp=$(BUILD)/bundle/%.o)
BUNDLE_ASAN_OBJ := $(BUNDLE_CXX_SRC:src/edge/%.cpp=$(BUILD)/bundle-asan/%.o)

.PHONY: bundle-check bundle-check-asan

$(BUILD)/bundle/%.o: src/edge/%.cpp $(BUNDLE_HEADERS)
	@mkdir -p $(@D)
	$(CXX) $(BUNDLE_CXXFLAGS) $(CXXFLAGS) -O2 -c $< -o $@

# the driver links libnora_edge_pre.a for sha256.c and nora_edge_pixel_values_size (C objects built by mk/edge.mk)
$(BUILD)/bundle/bundle_check: tools/bundle_check.cpp $(BUNDLE_OBJ) $(BUILD)/libnora_edge_pre.a $(BUNDLE_HEADERS)
	$(CXX) $(BUNDLE_CXXFLAGS) $(CXXFLAGS) -O2 $< $(BUNDLE_OBJ) $(BUILD)/libnora_edge_pre.a $(EDGE_LDLIBS) -o $@

$(BUILD)/bundle-asan/%.o: src/edge/%.cpp $(BUNDLE_HEADERS)
	@mkdir -p $(@D)
	$(CXX) $(BUNDLE_CXXFLAGS) $(ASAN_FLAGS) -c $< -o $@

$(BUILD)/bundle-asan/bundle_check: tools/bundle_check.cpp $(BUNDLE_ASAN_OBJ) $(EDGE_ASAN_OBJ) $(BUNDLE_HEADERS)
	$(CXX) $(BUNDLE_CXXFLAGS) $(ASAN_FLAGS) $< $(BUNDLE_ASAN_OBJ) $(EDGE_ASAN_OBJ) $(EDGE_LDLIBS) -o $@

bundle-check: $(BUILD)/bundle/bundle_check
bundle-check-asan: $(BUILD)/bundle-asan/bundle_check
