# mk/ort.mk — onnxruntime from C for libnora_edge: headers, the run-time loader, a decoder step driver.
#
#   make -C kernels ort-headers   onnxruntime's C headers into $(BUILD)/ort/include (Debian trixie's
#                                 libonnxruntime-dev 1.21, fetched with `apt-get download` through a private apt
#                                 configuration under $(BUILD)/ort/apt: /etc/apt is never touched). No PyPI
#                                 package ships them; the 1.21 C API (ORT_API_VERSION 21) is served by the wheel's
#                                 newer library (onnxruntime keeps old API versions: onnxruntime_c_api.h, GetApi).
#   make -C kernels ort-step      $(BUILD)/ort/ort_step: runs a bundle's decoder graph from C (tools/ort_step.c)
#   make -C kernels asan-ort-step the same driver under AddressSanitizer + UBSan
# The library is not linked: src/ort/ort_run.c dlopen()s it at run time (ORT_LIB / the caller's path), so the
# firmware picks the onnxruntime of its platform (the Jetson wheels' CUDA/TensorRT build) without a rebuild.
ORT_DIR := $(BUILD)/ort
ORT_INC := $(ORT_DIR)/include
ORT_DEB := libonnxruntime-dev
ORT_SUITE ?= trixie
ORT_APT = -o Dir::Etc::sourcelist=/dev/null -o Dir::Etc::sourceparts=$(abspath $(ORT_DIR))/apt/etc \
  -o Dir::State::Lists=$(abspath $(ORT_DIR))/apt/lists -o Dir::Cache=$(abspath $(ORT_DIR))/apt/cache \
  -o Dir::State::status=/var/lib/dpkg/status -o Debug::NoLocking=1
ORT_SRC := src/ort/ort_run.c
ORT_HDR := src/ort/ort_run.h $(ORT_INC)/onnxruntime_c_api.h

.PHONY: ort-headers ort-step asan-ort-step
ort-headers: $(ORT_INC)/onnxruntime_c_api.h

$(ORT_INC)/onnxruntime_c_api.h:
	rm -rf $(ORT_DIR)/apt $(ORT_DIR)/deb && mkdir -p $(ORT_DIR)/apt/etc $(ORT_DIR)/apt/lists/partial \
	  $(ORT_DIR)/apt/cache/archives/partial $(ORT_DIR)/deb
	printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: $(ORT_SUITE)\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
	  > $(ORT_DIR)/apt/etc/$(ORT_SUITE).sources
	apt-get $(ORT_APT) update -qq
	cd $(ORT_DIR)/deb && apt-get $(ORT_APT) download -qq $(ORT_DEB)
	dpkg-deb -x $(ORT_DIR)/deb/$(ORT_DEB)_*.deb $(ORT_DIR)/deb/x
	mkdir -p $(ORT_INC) && cp $(ORT_DIR)/deb/x/usr/include/onnxruntime/onnxruntime_c_api.h $(ORT_INC)/

$(BUILD)/ort/ort_step: tools/ort_step.c $(ORT_SRC) $(ORT_HDR)
	$(CC) -std=c11 $(WARN) -ffp-contract=off $(CFLAGS) -Isrc/ort -I$(ORT_INC) tools/ort_step.c $(ORT_SRC) -ldl -o $@

$(BUILD)/ort/ort_step_asan: tools/ort_step.c $(ORT_SRC) $(ORT_HDR)
	$(CC) -std=c11 $(WARN) -ffp-contract=off $(ASAN_FLAGS) -Isrc/ort -I$(ORT_INC) tools/ort_step.c $(ORT_SRC) -ldl -o $@

ort-step: $(BUILD)/ort/ort_step
asan-ort-step: $(BUILD)/ort/ort_step_asan
