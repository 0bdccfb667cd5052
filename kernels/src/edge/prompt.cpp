// prompt.cpp: NORA's prompt ids and mrope positions (see prompt.h for the data flow).
//
// A line-by-line port of nora_edge/prompt.py (PromptBuilder.instruction_ids / build, rope_index,
// decode_position_ids), itself a port of transformers' Qwen2_5_VLModel.get_rope_index for still images
// (transformers/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py), checked against HF by
// tests/runtime/test_prompt.py and against prompt.py by tests/kernels/test_edge_prompt.py.
#include "edge/prompt.h"

#include <utf8proc.h>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <utility>

namespace nora_edge {

namespace {

// Python's str.isspace() code points (Python 3.11: `[c for c in range(0x110000) if chr(c).isspace()]`); str.strip()
// with no argument strips exactly these.
bool py_isspace(int32_t c) {
    return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f ||
           c == 0x3000;
}

// Next code point of `s` from `i` (advanced); -1 on invalid UTF-8 (utf8proc's strict decoder).
int32_t next_cp(std::string_view s, size_t &i) {
    utf8proc_int32_t cp = -1;
    utf8proc_ssize_t n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t *>(s.data() + i),
                                          static_cast<utf8proc_ssize_t>(s.size() - i), &cp);
    if (n <= 0) {
        i = s.size();
        return -1;
    }
    i += static_cast<size_t>(n);
    return cp;
}

// Python's `not text.strip()`; text that is not valid UTF-8 is not blank (the tokenizer then refuses it).
bool py_blank(std::string_view s) {
    size_t i = 0;
    while (i < s.size()) {
        int32_t c = next_cp(s, i);
        if (c < 0 || !py_isspace(c)) return false;
    }
    return true;
}

// Python's str.isprintable() for one code point (CPython Objects/unicodectype.c: not printable iff category
// Cc, Cf, Cs, Co, Cn, Zl, Zp or Zs other than the space). utf8proc's tables may be a Unicode version behind.
bool py_printable(int32_t c) {
    if (c == ' ') return true;
    switch (utf8proc_category(c)) {
        case UTF8PROC_CATEGORY_CC:
        case UTF8PROC_CATEGORY_CF:
        case UTF8PROC_CATEGORY_CS:
        case UTF8PROC_CATEGORY_CO:
        case UTF8PROC_CATEGORY_CN:
        case UTF8PROC_CATEGORY_ZL:
        case UTF8PROC_CATEGORY_ZP:
        case UTF8PROC_CATEGORY_ZS:
            return false;
        default:
            return true;
    }
}

std::string ids_list(const std::vector<int64_t> &v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
    return s + "]";
}

std::string grid_str(const int64_t *g) {
    return "(t=" + std::to_string(g[0]) + ", h=" + std::to_string(g[1]) + ", w=" + std::to_string(g[2]) + ")";
}

bool contains(const std::vector<int64_t> &v, int64_t x) { return std::find(v.begin(), v.end(), x) != v.end(); }

constexpr int64_t kMaxGridTokens = int64_t{1} << 31;  // t*h*w guard (Python would overflow int64 / run out of memory)

}  // namespace

std::string py_repr(std::string_view utf8, size_t max_chars) {
    // quote choice of CPython's unicode_repr: single quotes unless the text has ' and no "
    size_t n = 0, i = 0;
    bool sq = false, dq = false;
    while (i < utf8.size() && n < max_chars) {
        int32_t c = next_cp(utf8, i);
        sq |= c == '\'';
        dq |= c == '"';
        ++n;
    }
    const char quote = (sq && !dq) ? '"' : '\'';
    std::string out(1, quote);
    char buf[16];
    i = 0;
    n = 0;
    while (i < utf8.size() && n < max_chars) {
        size_t start = i;
        int32_t c = next_cp(utf8, i);
        ++n;
        if (c < 0) {  // not reachable from Python; shown as the remaining bytes
            for (size_t k = start; k < utf8.size(); ++k) {
                std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned char>(utf8[k]));
                out += buf;
            }
            break;
        }
        if (c == quote || c == '\\') {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c == '\t') {
            out += "\\t";
        } else if (c == '\n') {
            out += "\\n";
        } else if (c == '\r') {
            out += "\\r";
        } else if (c < 0x20 || c == 0x7f) {
            std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned>(c));
            out += buf;
        } else if (c < 0x7f || py_printable(c)) {
            out.append(utf8.substr(start, i - start));
        } else if (c <= 0xff) {
            std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned>(c));
            out += buf;
        } else if (c <= 0xffff) {
            std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
            out += buf;
        } else {
            std::snprintf(buf, sizeof buf, "\\U%08x", static_cast<unsigned>(c));
            out += buf;
        }
    }
    return out + quote;
}

PromptBuilder::PromptBuilder(PromptPieces pieces) : pieces_(std::move(pieces)) {
    const PromptPieces &p = pieces_;
    auto bad = [](const std::string &m) { throw PromptError(NORA_EDGE_ERR_BUNDLE, "manifest prompt: " + m); };
    if (p.spatial_merge_size < 1)
        bad("spatial_merge_size must be >= 1, got " + std::to_string(p.spatial_merge_size));
    if (p.max_instruction_tokens < 1)
        bad("max_instruction_tokens must be >= 1, got " + std::to_string(p.max_instruction_tokens));
    if (p.image_pad_id == p.vision_end_id)
        bad("image_pad_id and vision_end_id are both " + std::to_string(p.image_pad_id));
    // an image pad outside the image run splits it: rope_index would refuse every prompt
    if (contains(p.prefix_ids, p.image_pad_id))
        bad("prefix_ids contain the image_pad_id " + std::to_string(p.image_pad_id));
    if (contains(p.suffix_ids, p.image_pad_id))
        bad("suffix_ids contain the image_pad_id " + std::to_string(p.image_pad_id));
    forbidden_ = p.forbidden_ids;
    forbidden_.push_back(p.image_pad_id);
    forbidden_.push_back(p.vision_end_id);
    std::sort(forbidden_.begin(), forbidden_.end());
    forbidden_.erase(std::unique(forbidden_.begin(), forbidden_.end()), forbidden_.end());
}

void PromptBuilder::check_instruction(const std::vector<int32_t> &ids, std::string_view text) const {
    if (ids.empty()) throw PromptError(NORA_EDGE_ERR_INPUT, "instruction is empty: " + py_repr(text));
    if (static_cast<int64_t>(ids.size()) > pieces_.max_instruction_tokens)
        throw PromptError(NORA_EDGE_ERR_INPUT, "instruction is too long: " + std::to_string(ids.size()) +
                                                   " tokens > max_instruction_tokens " +
                                                   std::to_string(pieces_.max_instruction_tokens) + " (" +
                                                   py_repr(text, 60) + "...)");
    std::vector<int64_t> hit;
    for (int32_t id : ids)
        if (std::binary_search(forbidden_.begin(), forbidden_.end(), int64_t{id})) hit.push_back(id);
    if (!hit.empty()) {
        std::sort(hit.begin(), hit.end());
        hit.erase(std::unique(hit.begin(), hit.end()), hit.end());
        if (hit.size() > 5) hit.resize(5);
        throw PromptError(NORA_EDGE_ERR_INPUT,
                          "instruction contains special token id(s) " + ids_list(hit) + ": " + py_repr(text, 80));
    }
}

std::vector<int32_t> PromptBuilder::instruction_ids(const Tokenizer &tok, std::string_view instruction) const {
    if (py_blank(instruction))
        throw PromptError(NORA_EDGE_ERR_INPUT, "instruction is empty: " + py_repr(instruction));
    std::vector<int32_t> ids = tok.encode(instruction);  // TokenizerError passes through with its status
    check_instruction(ids, instruction);
    return ids;
}

size_t PromptBuilder::prompt_length(size_t n_instruction, const int64_t *grid_thw, size_t grid_rows) const {
    if (grid_rows != 1)
        throw PromptError(NORA_EDGE_ERR_INPUT, "NORA prompts hold exactly one image; image_grid_thw has " +
                                                   std::to_string(grid_rows) + " rows");
    if (grid_thw == nullptr) throw PromptError(NORA_EDGE_ERR_INPUT, "image_grid_thw is NULL");
    const int64_t t = grid_thw[0], h = grid_thw[1], w = grid_thw[2], m = pieces_.spatial_merge_size;
    // Python accepts any int64 grid; a non-positive or huge one has no meaningful prompt (refused here by name)
    if (t < 0 || h < 0 || w < 0 || (t && h && w && (h > kMaxGridTokens / t || w > kMaxGridTokens / (t * h))))
        throw PromptError(NORA_EDGE_ERR_INPUT, "image grid " + grid_str(grid_thw) +
                                                   " must hold non-negative values with t*h*w <= 2**31");
    const int64_t n_img = t * h * w / (m * m);  // prompt.py: int(grid[0].prod()) // m**2
    // rope_index's checks on the single image run (prefix/suffix hold no image pad: checked at construction)
    if (n_img == 0)
        throw PromptError(NORA_EDGE_ERR_INPUT, "prompt has 0 image-token runs but image_grid_thw has 1 rows");
    const int64_t need = t * (h / m) * (w / m);
    if (need != n_img)
        throw PromptError(NORA_EDGE_ERR_INPUT, "image run 0 has " + std::to_string(n_img) + " tokens but grid " +
                                                   grid_str(grid_thw) + " / merge " + std::to_string(m) +
                                                   " needs " + std::to_string(need));
    return pieces_.prefix_ids.size() + static_cast<size_t>(n_img) + 1 + n_instruction + pieces_.suffix_ids.size();
}

PromptInfo PromptBuilder::build_into(const std::vector<int32_t> &instruction, const int64_t *grid_thw,
                                     size_t grid_rows, int64_t *input_ids, int64_t *position_ids, size_t capacity,
                                     std::string_view text) const {
    check_instruction(instruction, text);
    const size_t S = prompt_length(instruction.size(), grid_thw, grid_rows);
    if (input_ids == nullptr || position_ids == nullptr || capacity < S)
        throw PromptError(NORA_EDGE_ERR_INPUT, "prompt buffers hold " + std::to_string(capacity) +
                                                   " tokens (or are NULL); the prompt needs " + std::to_string(S));
    const int64_t m = pieces_.spatial_merge_size;
    const int64_t lt = grid_thw[0], lh = grid_thw[1] / m, lw = grid_thw[2] / m;
    const size_t n_img = static_cast<size_t>(lt * lh * lw);
    int64_t *pt = position_ids, *ph = position_ids + S, *pw = position_ids + 2 * S;
    size_t k = 0;
    int64_t pos = 0, max_pos = -1;
    auto text_tok = [&](int64_t id) {  // a text token: the same position on all three axes
        input_ids[k] = id;
        pt[k] = ph[k] = pw[k] = pos;
        max_pos = std::max(max_pos, pos);
        ++pos;
        ++k;
    };
    for (int64_t id : pieces_.prefix_ids) text_tok(id);
    const size_t image_start = k;
    for (int64_t f = 0; f < lt; ++f)  // image run, (frame, row, col) order as np.meshgrid(indexing="ij")
        for (int64_t r = 0; r < lh; ++r)
            for (int64_t c = 0; c < lw; ++c) {
                input_ids[k] = pieces_.image_pad_id;
                pt[k] = pos + f;
                ph[k] = pos + r;
                pw[k] = pos + c;
                ++k;
            }
    max_pos = std::max(max_pos, pos + std::max({lt, lh, lw}) - 1);
    pos += std::max(lh, lw);  // HF advances by the larger merged side, not the token count
    text_tok(pieces_.vision_end_id);
    for (int32_t id : instruction) text_tok(id);
    for (int64_t id : pieces_.suffix_ids) text_tok(id);
    PromptInfo info;
    info.length = S;
    info.rope_delta = max_pos + 1 - static_cast<int64_t>(S);
    info.image_start = static_cast<int64_t>(image_start);
    info.num_image_tokens = static_cast<int64_t>(n_img);
    return info;
}

Prompt PromptBuilder::build(const std::vector<int32_t> &instruction, const int64_t *grid_thw, size_t grid_rows,
                            std::string_view text) const {
    check_instruction(instruction, text);
    const size_t S = prompt_length(instruction.size(), grid_thw, grid_rows);
    Prompt p;
    p.input_ids.resize(S);
    p.position_ids.resize(3 * S);
    p.info = build_into(instruction, grid_thw, grid_rows, p.input_ids.data(), p.position_ids.data(), S, text);
    return p;
}

Prompt PromptBuilder::build(const Tokenizer &tok, std::string_view instruction, const int64_t *grid_thw,
                            size_t grid_rows) const {
    return build(instruction_ids(tok, instruction), grid_thw, grid_rows, instruction);
}

nora_edge_status decode_positions(int64_t index, int64_t rope_delta, size_t length, int64_t *out,
                                  size_t out_len) noexcept {
    constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
    if (out == nullptr || index < 0 || length > out_len / 3) return NORA_EDGE_ERR_INPUT;
    if (length == 0) return NORA_EDGE_OK;
    const int64_t last = static_cast<int64_t>(length) - 1;  // length <= out_len / 3 fits int64
    if (index > kMax - last) return NORA_EDGE_ERR_INPUT;
    const int64_t hi = index + last;
    if (rope_delta > 0 && hi > kMax - rope_delta) return NORA_EDGE_ERR_INPUT;  // index >= 0: no underflow
    for (size_t k = 0; k < length; ++k) {
        const int64_t p = index + static_cast<int64_t>(k) + rope_delta;
        out[k] = out[length + k] = out[2 * length + k] = p;
    }
    return NORA_EDGE_OK;
}

}  // namespace nora_edge
