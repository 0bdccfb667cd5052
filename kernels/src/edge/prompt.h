/* prompt.h: libnora_edge's prompt assembly and mrope positions (internal C++17 API; the C ABI will wrap it).
 *
 * Data flow (the same steps, checks and order as nora_edge/prompt.py's PromptBuilder.build + rope_index):
 *   instruction (UTF-8) --empty / whitespace-only check (Python's str.strip() whitespace)-->
 *   --Tokenizer::encode (tokenizer.h)--> ids --length <= max_instruction_tokens, no forbidden id--> instruction ids
 *   image grid (t, h, w) in patches, merge m --n_img = t*h*w / m^2 (floor, like Python's //)-->
 *   input_ids (S,) = prefix + [image_pad] * n_img + [vision_end] + instruction + suffix
 *   --rope_index (port of transformers' Qwen2_5_VLModel.get_rope_index for images, as prompt.py does it)-->
 *   position_ids (3, S) int64 (rows t, h, w): text counts up on all three axes; the image run starting at text
 *   position s gets (s + frame, s + row, s + col) over the merged (t, h/m, w/m) grid; the text after it resumes at
 *   s + max(h/m, w/m); rope_delta = max(position_ids) + 1 - S.
 *   generated token at absolute index p: (p + rope_delta) on all three axes (decode_positions; no allocation).
 *
 * Errors are PromptError carrying the nora_edge.h status: NORA_EDGE_ERR_BUNDLE for manifest pieces that could
 * never build a prompt (merge size < 1, max_instruction_tokens < 1, the image pad id in the prefix/suffix or equal
 * to the vision end id: the Python builder fails on every build with such pieces), NORA_EDGE_ERR_INPUT for the
 * caller's bad input (empty / too long instruction, forbidden ids, grid rows != 1, a grid whose merged size does
 * not match its token count, small buffers), and the tokenizer's own status (TokenizerError, tokenizer.h) for
 * text it refuses. Messages follow prompt.py's (instruction shown like Python's repr()).
 * A PromptBuilder is immutable after construction: its methods are const and thread-safe.
 */
#ifndef NORA_EDGE_PROMPT_H
#define NORA_EDGE_PROMPT_H

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "edge/tokenizer.h"
#include "nora_edge.h"

namespace nora_edge {

/* A failure with the status code nora_edge.h returns for it; what() is the message. */
class PromptError : public std::runtime_error {
   public:
    PromptError(nora_edge_status status, const std::string &message)
        : std::runtime_error(message), status_(status) {}
    nora_edge_status status() const noexcept { return status_; }

   private:
    nora_edge_status status_;
};

/* The manifest's prompt pieces (what nora_edge.prompt.PromptBuilder takes). */
struct PromptPieces {
    std::vector<int64_t> prefix_ids;     /* system turn + "<|im_start|>user\n<|vision_start|>" */
    int64_t image_pad_id = -1;           /* <|image_pad|> */
    int64_t vision_end_id = -1;          /* <|vision_end|> */
    std::vector<int64_t> suffix_ids;     /* "<|im_end|>\n<|im_start|>assistant\n" */
    int64_t spatial_merge_size = 2;      /* m of the vision merger */
    int64_t max_instruction_tokens = 512;
    std::vector<int64_t> forbidden_ids;  /* added tokens + action ids; image pad and vision end are added */
};

/* Scalars of one assembled prompt (the arrays live in the caller's buffers or in Prompt). */
struct PromptInfo {
    size_t length = 0;            /* S */
    int64_t rope_delta = 0;       /* decode position of absolute index p is p + rope_delta */
    int64_t image_start = 0;      /* index of the first image pad (= prefix length) */
    int64_t num_image_tokens = 0; /* merged patches in the prompt */
};

/* One assembled prompt with its own storage. */
struct Prompt {
    std::vector<int64_t> input_ids;    /* (S,) */
    std::vector<int64_t> position_ids; /* (3, S) row-major: t row, h row, w row */
    PromptInfo info;
};

class PromptBuilder {
   public:
    /* Check and keep the pieces. Throws PromptError(BUNDLE) naming the bad piece. */
    explicit PromptBuilder(PromptPieces pieces);

    /* Instruction text -> its ids, checked like PromptBuilder.instruction_ids: empty / whitespace-only (INPUT),
     * the tokenizer's refusals (TokenizerError: INPUT for invalid UTF-8, UNSUPPORTED), longer than
     * max_instruction_tokens (INPUT), holding a forbidden id (INPUT). */
    std::vector<int32_t> instruction_ids(const Tokenizer &tok, std::string_view instruction) const;

    /* Tokens of the prompt for `n_instruction` instruction ids and a grid; throws PromptError(INPUT) on a grid
     * build() refuses. grid_thw: (grid_rows, 3) int64. */
    size_t prompt_length(size_t n_instruction, const int64_t *grid_thw, size_t grid_rows) const;

    /* Assemble into caller buffers: input_ids (S,) and position_ids (3, S) with capacity `capacity` tokens
     * (>= prompt_length). `instruction` are ids from instruction_ids() (checked again for length and forbidden
     * ids; `text` only names the instruction in messages). Nothing is written on failure. Throws PromptError. */
    PromptInfo build_into(const std::vector<int32_t> &instruction, const int64_t *grid_thw, size_t grid_rows,
                          int64_t *input_ids, int64_t *position_ids, size_t capacity,
                          std::string_view text = {}) const;

    /* The same into a Prompt (allocates). */
    Prompt build(const std::vector<int32_t> &instruction, const int64_t *grid_thw, size_t grid_rows,
                 std::string_view text = {}) const;
    /* The whole path: text -> instruction_ids -> build. */
    Prompt build(const Tokenizer &tok, std::string_view instruction, const int64_t *grid_thw,
                 size_t grid_rows) const;

    const PromptPieces &pieces() const noexcept { return pieces_; }

   private:
    void check_instruction(const std::vector<int32_t> &ids, std::string_view text) const;
    PromptPieces pieces_;
    std::vector<int64_t> forbidden_;  /* sorted, unique, with image pad and vision end */
};

/* Positions of `length` generated tokens from absolute index `index` on: out (3, length) row-major, every axis
 * index + k + rope_delta (nora_edge.prompt.decode_position_ids). out_len is out's capacity in int64s. Returns
 * NORA_EDGE_ERR_INPUT (nothing written) for a NULL out, a negative index, out_len < 3*length, or int64
 * overflow; no allocation, no exception. */
nora_edge_status decode_positions(int64_t index, int64_t rope_delta, size_t length, int64_t *out,
                                  size_t out_len) noexcept;

/* Python's repr() of the first `max_chars` code points of a UTF-8 string (for messages; exported for tests). */
std::string py_repr(std::string_view utf8, size_t max_chars = static_cast<size_t>(-1));

}  // namespace nora_edge

#endif /* NORA_EDGE_PROMPT_H */
