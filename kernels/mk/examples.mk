# mk/examples.mk — programs that use libnora_edge the way firmware / a robot node does (included by kernels/Makefile).
#
#   make -C kernels examples       $(BUILD)/run_bundle (examples/run_bundle.c, C11 + libpng: one frame through a
#                                  bundle, JSON on stdout) and $(BUILD)/robot_loop (examples/robot_loop.cpp, C++17:
#                                  an RAII wrapper + fake camera + select_action at a fixed rate)
#   make -C kernels examples-deps  install libpng-dev when `dpkg -s` says it is missing (apt-get install -y; sudo
#                                  when not root, like edge-deps in mk/tokenizer.mk, which now also runs it);
#                                  $(BUILD)/run_bundle runs it first (order-only), so a plain build installs it
# Both link the shared runtime $(BUILD)/libnora_edge.so (mk/runtime.mk) by name, with an rpath to $(BUILD), so
# they run from anywhere without LD_LIBRARY_PATH; onnxruntime is found at run time (--ort PATH or
# $NORA_EDGE_ONNXRUNTIME). Usage of each program: the comment at the top of its source.
EXAMPLES_APT_PACKAGES := libpng-dev
EXAMPLES_SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
# recursive (=): evaluated when a recipe runs, i.e. after examples-deps installed libpng
EXAMPLES_PNG_CFLAGS = $(shell pkg-config --cflags libpng 2>/dev/null)
EXAMPLES_PNG_LIBS = $(or $(shell pkg-config --libs libpng 2>/dev/null),-lpng)
EXAMPLES_LINK = -L$(BUILD) -l:libnora_edge.so -Wl,-rpath,$(abspath $(BUILD))
EXAMPLES_CXXWARN = $(filter-out -Wstrict-prototypes,$(WARN))

.PHONY: examples examples-deps
examples: $(BUILD)/run_bundle $(BUILD)/robot_loop

# edge-deps (mk/tokenizer.mk) installs every Debian package of libnora_edge, the examples' libpng included
edge-deps: examples-deps

examples-deps:
	dpkg -s $(EXAMPLES_APT_PACKAGES) >/dev/null 2>&1 || ($(EXAMPLES_SUDO) apt-get update -q && \
		$(EXAMPLES_SUDO) apt-get install -y -q $(EXAMPLES_APT_PACKAGES))

$(BUILD)/run_bundle: examples/run_bundle.c include/nora_edge.h $(BUILD)/libnora_edge.so | examples-deps
	$(CC) -std=c11 $(WARN) $(CFLAGS) -Iinclude $(EXAMPLES_PNG_CFLAGS) $< $(EXAMPLES_LINK) $(EXAMPLES_PNG_LIBS) -o $@

$(BUILD)/robot_loop: examples/robot_loop.cpp include/nora_edge.h $(BUILD)/libnora_edge.so
	$(CXX) -std=c++17 $(EXAMPLES_CXXWARN) -O2 $(CXXFLAGS) -Iinclude $< $(EXAMPLES_LINK) -o $@
