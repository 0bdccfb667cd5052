// npy.cpp: the embeddings table reader of libnora_edge (see bundle.h, class Npy).
// Format: numpy's NEP 1 / format.py (https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html):
// "\x93NUMPY", major, minor, header length (uint16 LE for 1.x, uint32 LE for 2.x/3.x), a Python dict literal
// {'descr': '<f2', 'fortran_order': False, 'shape': (R, C), } padded with spaces to a multiple of 64, then the
// data. The table is mmap()ed read-only; rows are gathered and widened to float32.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "edge/bundle.h"

namespace nora_edge {
namespace {

[[noreturn]] void fail(const std::string &msg) { throw BundleError(NORA_EDGE_ERR_BUNDLE, msg); }

// value of 'key' in the header dict literal: the text after "'key':" up to the matching end
std::string header_field(const std::string &h, const std::string &key, const std::string &path) {
    const std::string tag = "'" + key + "':";
    size_t at = h.find(tag);
    if (at == std::string::npos) fail(path + ": .npy header lacks '" + key + "'");
    at += tag.size();
    while (at < h.size() && h[at] == ' ') at++;
    size_t end = at;
    if (at < h.size() && h[at] == '(') end = h.find(')', at) + 1;
    else if (at < h.size() && h[at] == '\'') end = h.find('\'', at + 1) + 1;
    else end = h.find_first_of(",}", at);
    if (end == std::string::npos || end == 0 || end > h.size()) fail(path + ": malformed .npy header: " + h);
    return h.substr(at, end - at);
}

std::string shape_text(const std::vector<int64_t> &s) {
    std::string t = "(";
    for (size_t i = 0; i < s.size(); i++) t += (i ? ", " : "") + std::to_string(s[i]);
    return t + (s.size() == 1 ? ",)" : ")");
}

}  // namespace

uint32_t half_to_float_bits(uint16_t h) {
    // numpy/_core/src/common/half.hpp / npymath halffloat.c npy_halfbits_to_floatbits
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = h & 0x7c00u, mant = h & 0x03ffu;
    if (exp == 0) {
        if (mant == 0) return sign;  // signed zero
        // subnormal: normalise; value = mant * 2^-24
        int e = -1;
        do {
            e++;
            mant <<= 1;
        } while ((mant & 0x0400u) == 0);
        return sign + (static_cast<uint32_t>(112 - e) << 23) + ((mant & 0x03ffu) << 13);
    }
    if (exp == 0x7c00u) return sign + 0x7f800000u + (mant << 13);  // inf / NaN (payload kept)
    return sign + (((h & 0x7fffu) + 0x1c000u) << 13);                 // normal: rebias 15 -> 127
}

Npy Npy::open(const std::string &path, const std::string &dtype, const std::vector<int64_t> &shape) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(path + ": cannot read the embeddings table (" + std::strerror(errno) + ")");
    struct stat st;
    if (::fstat(fd, &st) != 0 || st.st_size <= 0) {
        ::close(fd);
        fail(path + ": cannot read the embeddings table (empty or unreadable)");
    }
    const size_t len = static_cast<size_t>(st.st_size);
    void *map = ::mmap(nullptr, len, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    if (map == MAP_FAILED) fail(path + ": cannot map the embeddings table (" + std::strerror(errno) + ")");
    Npy t;
    t.map_ = map;
    t.map_len_ = len;  // from here on t's destructor unmaps on a throw
    const unsigned char *p = static_cast<const unsigned char *>(map);
    if (len < 10 || std::memcmp(p, "\x93NUMPY", 6) != 0) fail(path + ": not a .npy file (bad magic)");
    size_t hlen, hstart;
    if (p[6] == 1) {
        hlen = p[8] | (static_cast<size_t>(p[9]) << 8);
        hstart = 10;
    } else if (p[6] == 2 || p[6] == 3) {
        if (len < 12) fail(path + ": truncated .npy header");
        hlen = p[8] | (static_cast<size_t>(p[9]) << 8) | (static_cast<size_t>(p[10]) << 16) |
               (static_cast<size_t>(p[11]) << 24);
        hstart = 12;
    } else {
        fail(path + ": .npy format version " + std::to_string(p[6]) + "." + std::to_string(p[7]) + " is not read");
    }
    if (hstart + hlen > len) fail(path + ": truncated .npy header");
    const std::string h(reinterpret_cast<const char *>(p + hstart), hlen);
    const std::string descr = header_field(h, "descr", path), order = header_field(h, "fortran_order", path);
    const std::string shp = header_field(h, "shape", path);
    std::string want;
    if (dtype == "float16") want = "'<f2'", t.itemsize_ = 2;
    else if (dtype == "float32") want = "'<f4'", t.itemsize_ = 4;
    else fail(std::string("manifest.json: field 'components.embeddings.dtype' = '") + dtype + "' is not float16/float32");
    if (descr != want) fail(path + ": embeddings dtype " + descr + " != manifest " + dtype);
    if (order != "False") fail(path + ": embeddings table is not C order (fortran_order " + order + ")");
    std::vector<int64_t> got;
    for (size_t i = 1; i + 1 < shp.size();) {  // "(R, C)" -> R, C
        while (i + 1 < shp.size() && (shp[i] == ' ' || shp[i] == ',')) i++;
        if (i + 1 >= shp.size()) break;
        size_t used = 0;
        try {
            got.push_back(std::stoll(shp.substr(i), &used));
        } catch (const std::exception &) {
            fail(path + ": malformed .npy shape " + shp);
        }
        i += used;
    }
    if (got != shape) fail(path + ": embeddings shape " + shape_text(got) + " != manifest " + shape_text(shape));
    if (got.size() != 2 || got[0] <= 0 || got[1] <= 0) fail(path + ": embeddings table must be 2-D, got " + shp);
    t.rows_ = got[0];
    t.cols_ = got[1];
    const size_t data = hstart + hlen;
    if ((len - data) / t.itemsize_ / static_cast<size_t>(t.cols_) != static_cast<size_t>(t.rows_) ||
        (len - data) % (t.itemsize_ * static_cast<size_t>(t.cols_)) != 0)
        fail(path + ": " + std::to_string(len - data) + " data bytes, shape " + shp + " needs " +
             std::to_string(static_cast<size_t>(t.rows_ * t.cols_) * t.itemsize_));
    t.data_ = p + data;
    return t;
}

Npy::Npy(Npy &&o) noexcept { *this = std::move(o); }

Npy &Npy::operator=(Npy &&o) noexcept {
    if (this != &o) {
        if (map_) ::munmap(map_, map_len_);
        map_ = o.map_;
        map_len_ = o.map_len_;
        data_ = o.data_;
        rows_ = o.rows_;
        cols_ = o.cols_;
        itemsize_ = o.itemsize_;
        o.map_ = nullptr;
        o.data_ = nullptr;
    }
    return *this;
}

Npy::~Npy() {
    if (map_) ::munmap(map_, map_len_);
}

void Npy::gather_f32(const int64_t *ids, size_t n, float *out) const {
    const size_t c = static_cast<size_t>(cols_);
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= rows_)
            throw BundleError(NORA_EDGE_ERR_INPUT, "embedding row id " + std::to_string(ids[i]) + " outside [0, " +
                                                       std::to_string(rows_) + ")");
        const unsigned char *row = data_ + static_cast<size_t>(ids[i]) * c * itemsize_;
        float *dst = out + i * c;
        if (itemsize_ == 4) {
            std::memcpy(dst, row, c * 4);  // little-endian host assumed (x86-64, aarch64)
        } else {
            for (size_t j = 0; j < c; j++) {
                uint16_t hbits;
                std::memcpy(&hbits, row + 2 * j, 2);
                const uint32_t fbits = half_to_float_bits(hbits);
                std::memcpy(dst + j, &fbits, 4);
            }
        }
    }
}

}  // namespace nora_edge
