// prompt_check: run libnora_edge's prompt assembly (src/edge/prompt.h) over a file of cases, for the tests.
//
//   prompt_check TOKENIZER_JSON CASES_FILE
//
// Input: one JSON object per line: {"instruction": str, "grid": [t, h, w] (3*k values: k grid rows), "merge": m,
// "prefix": [ids], "suffix": [ids], "image_pad": id, "vision_end": id, "max_instruction_tokens": n,
// "forbidden": [ids], "decode_at": [p, ...]}.
// Output (stdout), one line per case: {"input_ids": [S], "position_ids": [[S], [S], [S]], "rope_delta": d,
// "image_start": i, "num_image_tokens": n, "decode_positions": [[t, h, w] per p], "decode_run": (3, 4) positions
// of 4 tokens from decode_at[0] (absent when decode_at is empty)}, or `ERR <status> <message>` with the
// nora_edge_status number (1 INPUT, 2 BUNDLE, 5 UNSUPPORTED). The text -> ids path is Tokenizer::encode; the
// prompt is built twice (into caller buffers and into a Prompt) and both must agree. A tokenizer.json that does
// not load prints `LOAD_ERR <status> <message>` and exits 3; a malformed case line exits 2.
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "edge/prompt.h"
#include "edge/tokenizer.h"

namespace {

using nlohmann::json;
using nora_edge::PromptError;
using nora_edge::TokenizerError;

std::vector<int64_t> ints(const json &j, const char *key) {
    std::vector<int64_t> v;
    for (const json &x : j.at(key)) v.push_back(x.get<int64_t>());
    return v;
}

std::string one_line(std::string msg) {
    for (char &c : msg)
        if (c == '\n' || c == '\r') c = ' ';
    return msg;
}

std::string run_case(const nora_edge::Tokenizer &tok, const json &c) {
    nora_edge::PromptPieces pieces;
    pieces.prefix_ids = ints(c, "prefix");
    pieces.suffix_ids = ints(c, "suffix");
    pieces.image_pad_id = c.at("image_pad").get<int64_t>();
    pieces.vision_end_id = c.at("vision_end").get<int64_t>();
    pieces.spatial_merge_size = c.at("merge").get<int64_t>();
    pieces.max_instruction_tokens = c.at("max_instruction_tokens").get<int64_t>();
    pieces.forbidden_ids = ints(c, "forbidden");
    const std::vector<int64_t> grid = ints(c, "grid");
    const std::vector<int64_t> decode_at = ints(c, "decode_at");
    const std::string text = c.at("instruction").get<std::string>();
    if (grid.size() % 3) throw std::invalid_argument("grid length is not a multiple of 3");
    try {
        nora_edge::PromptBuilder builder(std::move(pieces));
        std::vector<int32_t> ids = builder.instruction_ids(tok, text);
        const size_t S = builder.prompt_length(ids.size(), grid.data(), grid.size() / 3);
        std::vector<int64_t> in(S), pos(3 * S);
        nora_edge::PromptInfo info =
            builder.build_into(ids, grid.data(), grid.size() / 3, in.data(), pos.data(), S, text);
        nora_edge::Prompt p = builder.build(tok, text, grid.data(), grid.size() / 3);
        if (p.input_ids != in || p.position_ids != pos || p.info.rope_delta != info.rope_delta ||
            p.info.length != S || info.length != S)
            return "MISMATCH build_into and build disagree";
        json out;
        out["input_ids"] = in;
        out["position_ids"] = {std::vector<int64_t>(pos.begin(), pos.begin() + S),
                               std::vector<int64_t>(pos.begin() + S, pos.begin() + 2 * S),
                               std::vector<int64_t>(pos.begin() + 2 * S, pos.end())};
        out["rope_delta"] = info.rope_delta;
        out["image_start"] = info.image_start;
        out["num_image_tokens"] = info.num_image_tokens;
        json dec = json::array();
        int64_t one[3];
        for (int64_t at : decode_at) {
            nora_edge_status st = nora_edge::decode_positions(at, info.rope_delta, 1, one, 3);
            if (st != NORA_EDGE_OK)
                return "ERR " + std::to_string(st) + " decode_positions refused " + std::to_string(at);
            dec.push_back({one[0], one[1], one[2]});
        }
        out["decode_positions"] = dec;
        if (!decode_at.empty()) {
            int64_t run[12];
            if (nora_edge::decode_positions(decode_at[0], info.rope_delta, 4, run, 12) != NORA_EDGE_OK)
                return "ERR 1 decode_positions refused a run";
            out["decode_run"] = {std::vector<int64_t>(run, run + 4), std::vector<int64_t>(run + 4, run + 8),
                                 std::vector<int64_t>(run + 8, run + 12)};
        }
        return out.dump(-1, ' ', false, json::error_handler_t::replace);
    } catch (const PromptError &e) {
        return "ERR " + std::to_string(static_cast<int>(e.status())) + " " + one_line(e.what());
    } catch (const TokenizerError &e) {
        return "ERR " + std::to_string(static_cast<int>(e.status())) + " " + one_line(e.what());
    }
}

// Misuse of the buffer API: each must be refused without writing. Returns the number of failed checks.
int misuse_checks() {
    int bad = 0;
    int64_t buf[6] = {7, 7, 7, 7, 7, 7};
    bad += nora_edge::decode_positions(0, 0, 1, nullptr, 3) != NORA_EDGE_ERR_INPUT;
    bad += nora_edge::decode_positions(-1, 0, 1, buf, 3) != NORA_EDGE_ERR_INPUT;
    bad += nora_edge::decode_positions(0, 0, 2, buf, 5) != NORA_EDGE_ERR_INPUT;
    bad += nora_edge::decode_positions(INT64_MAX, 1, 1, buf, 3) != NORA_EDGE_ERR_INPUT;
    bad += nora_edge::decode_positions(INT64_MAX - 1, 0, 2, buf, 6) != NORA_EDGE_OK;  // fits exactly
    bad += nora_edge::decode_positions(INT64_MAX - 1, 0, 3, buf, 9) != NORA_EDGE_ERR_INPUT;
    for (int i = 0; i < 3; ++i) bad += buf[2 * i] != INT64_MAX - 1 || buf[2 * i + 1] != INT64_MAX;
    nora_edge::PromptPieces pc;
    pc.prefix_ids = {1, 2};
    pc.image_pad_id = 9;
    pc.vision_end_id = 10;
    pc.suffix_ids = {3};
    nora_edge::PromptBuilder b(pc);
    const int64_t grid[3] = {1, 4, 4};
    int64_t ids[16], pos[48];
    try {
        b.build_into({5, 6}, grid, 1, ids, pos, 9, "x");  // needs 2 + 4 + 1 + 2 + 1 = 10
        ++bad;
    } catch (const PromptError &e) {
        bad += e.status() != NORA_EDGE_ERR_INPUT;
    }
    try {
        b.build_into({5, 6}, nullptr, 1, ids, pos, 16, "x");
        ++bad;
    } catch (const PromptError &e) {
        bad += e.status() != NORA_EDGE_ERR_INPUT;
    }
    return bad;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s TOKENIZER_JSON CASES_FILE\n", argv[0]);
        return 2;
    }
    std::unique_ptr<nora_edge::Tokenizer> tok;
    try {
        tok = std::make_unique<nora_edge::Tokenizer>(nora_edge::Tokenizer::load(argv[1]));
    } catch (const TokenizerError &e) {
        std::printf("LOAD_ERR %d %s\n", static_cast<int>(e.status()), e.what());
        return 3;
    }
    if (int bad = misuse_checks()) {
        std::fprintf(stderr, "prompt_check: %d misuse checks failed\n", bad);
        return 4;
    }
    std::ifstream in(argv[2], std::ios::binary);
    if (!in) {
        std::fprintf(stderr, "prompt_check: cannot open %s\n", argv[2]);
        return 2;
    }
    std::string line;
    size_t n = 0;
    while (std::getline(in, line)) {
        ++n;
        std::string out;
        try {
            out = run_case(*tok, json::parse(line));
        } catch (const std::exception &e) {  // json errors, a bad grid length
            std::fprintf(stderr, "prompt_check: case %zu is malformed (%s)\n", n, e.what());
            return 2;
        }
        out.push_back('\n');
        std::fwrite(out.data(), 1, out.size(), stdout);
    }
    std::fprintf(stderr, "prompt_check: %zu cases\n", n);
    return 0;
}
