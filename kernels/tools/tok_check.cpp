// tok_check: run libnora_edge's tokenizer (src/edge/tokenizer.h) over a file of strings, for the tests.
//
//   tok_check TOKENIZER_JSON STRINGS_FILE
//
// Input: one string per line, either a JSON string literal ("pick up the cup\n" keeps multi-line text on one
// line) or `hex:` followed by the bytes in hex (for invalid UTF-8, which JSON cannot carry).
// Output (stdout), one line per input line: the ids separated by single spaces (an empty line for no ids), or
// `ERR <status> <message>` with the nora_edge_status number (1 INPUT, 5 UNSUPPORTED, ...).
// A tokenizer.json that does not load prints `LOAD_ERR <status> <message>` and exits 3; a malformed input line
// exits 2. stderr gets one summary line: strings, bytes, ids and the encode time in microseconds.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "edge/tokenizer.h"

namespace {

int hex_val(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

bool parse_line(const std::string &line, std::string &out) {
    if (line.rfind("hex:", 0) == 0) {
        if ((line.size() - 4) % 2) return false;
        out.clear();
        for (size_t i = 4; i < line.size(); i += 2) {
            int hi = hex_val(line[i]), lo = hex_val(line[i + 1]);
            if (hi < 0 || lo < 0) return false;
            out.push_back(static_cast<char>(hi * 16 + lo));
        }
        return true;
    }
    try {
        nlohmann::json j = nlohmann::json::parse(line);
        if (!j.is_string()) return false;
        out = j.get<std::string>();
        return true;
    } catch (const nlohmann::json::exception &) {
        return false;
    }
}

}  // namespace

int main(int argc, char **argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s TOKENIZER_JSON STRINGS_FILE\n", argv[0]);
        return 2;
    }
    std::unique_ptr<nora_edge::Tokenizer> tok;
    try {
        tok = std::make_unique<nora_edge::Tokenizer>(nora_edge::Tokenizer::load(argv[1]));
    } catch (const nora_edge::TokenizerError &e) {
        std::printf("LOAD_ERR %d %s\n", static_cast<int>(e.status()), e.what());
        return 3;
    }
    std::ifstream in(argv[2], std::ios::binary);
    if (!in) {
        std::fprintf(stderr, "tok_check: cannot open %s\n", argv[2]);
        return 2;
    }
    std::string line, text, buf;
    size_t n_lines = 0, n_bytes = 0, n_ids = 0;
    double micros = 0;
    while (std::getline(in, line)) {
        ++n_lines;
        if (!parse_line(line, text)) {
            std::fprintf(stderr, "tok_check: line %zu is neither a JSON string nor hex:<bytes>\n", n_lines);
            return 2;
        }
        n_bytes += text.size();
        buf.clear();
        auto t0 = std::chrono::steady_clock::now();
        try {
            std::vector<int32_t> ids = tok->encode(text);
            micros += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
            n_ids += ids.size();
            for (size_t i = 0; i < ids.size(); ++i) {
                if (i) buf.push_back(' ');
                buf += std::to_string(ids[i]);
            }
        } catch (const nora_edge::TokenizerError &e) {
            micros += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
            std::string msg = e.what();
            for (char &c : msg)
                if (c == '\n' || c == '\r') c = ' ';
            buf = "ERR " + std::to_string(static_cast<int>(e.status())) + " " + msg;
        }
        buf.push_back('\n');
        std::fwrite(buf.data(), 1, buf.size(), stdout);
    }
    std::fprintf(stderr, "tok_check: %zu strings, %zu bytes, %zu ids, encode %.0f us\n", n_lines, n_bytes, n_ids,
                 micros);
    return 0;
}
