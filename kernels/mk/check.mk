# mk/check.mk — replay a test corpus against the library (included by kernels/Makefile).
#
#   make -C kernels asan  CORPUS=<dir> NATIVE=<dir>   $(BUILD)/asan/check_corpus: the library sources and
#                         tools/check_corpus.c built with AddressSanitizer + UndefinedBehaviorSanitizer (any report
#                         aborts: -fno-sanitize-recover=all; leaks are reported at exit), run on the corpus
#   make -C kernels check CORPUS=<dir> NATIVE=<dir>   the same driver without sanitizers ($(BUILD)/check/)
# The corpus (inputs + the numpy reference's outputs) is written by tests/kernels/corpus.py (CorpusWriter);
# NATIVE is the codec/native/ dir it was made for. The driver prints "PASS|FAIL <check> <name> <count>" lines.
CORPUS ?=
NATIVE ?= testdata/native
CHECK_SRC := $(CPU_SRC) src/cuda_stub.c
ASAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1
ASAN_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1 \
            UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

.PHONY: check

$(BUILD)/asan/%.o: src/%.c $(HEADERS)
	@mkdir -p $(@D)
	$(CC) $(BASEFLAGS) $(ASAN_FLAGS) -c $< -o $@

$(BUILD)/asan/check_corpus: tools/check_corpus.c $(CHECK_SRC:src/%.c=$(BUILD)/asan/%.o) include/nora_fast.h
	$(CC) -std=c11 $(WARN) -ffp-contract=off $(ASAN_FLAGS) -Iinclude $< $(filter %.o,$^) $(LDLIBS) -o $@

$(BUILD)/check/check_corpus: tools/check_corpus.c $(CHECK_SRC:src/%.c=$(BUILD)/cpu/%.o) include/nora_fast.h
	@mkdir -p $(@D)
	$(CC) -std=c11 $(WARN) -ffp-contract=off $(CFLAGS) -Iinclude $< $(filter %.o,$^) $(LDLIBS) -o $@

nf_need_corpus = @test -n "$(CORPUS)" || { echo "set CORPUS=<dir written by tests/kernels/corpus.py>" >&2; exit 2; }

asan: $(BUILD)/asan/check_corpus
	$(nf_need_corpus)
	$(ASAN_ENV) $(BUILD)/asan/check_corpus $(CORPUS) $(NATIVE)

check: $(BUILD)/check/check_corpus
	$(nf_need_corpus)
	$(BUILD)/check/check_corpus $(CORPUS) $(NATIVE)
