/* gateway._framer: the session's framer in C, an optional accelerator of gateway.protocol.

Why: a worker spends about a fifth of its CPU per call cutting FreeSWITCH's byte stream into
frames and events (tests/benchmark.py times it inside the workers), most of it interpreter work
around a few byte searches. This is the same framer as gateway.protocol's pure-Python
PySessionParser, which stays the reference: every frame built here is the object that one
builds, and anything this code is not sure about is handed to the Python functions that decide
it there (a header block over a limit or with a byte FreeSWITCH does not write, a block that is
not one of the common shapes, a plain event with a header order or inner length out of the
ordinary). So this file holds the fast path only; the rules live in one place, in Python.
tests/test_framer_accelerator.py feeds both the same streams and compares every item and every
error.

gateway.protocol calls bind() once at import, with the classes and functions named below; the
module is unusable before that.
*/
#define _GNU_SOURCE   /* memmem */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>

/* Bound by gateway.protocol at import (bind()). */
static PyObject *ProtocolError, *EventType, *FrameType, *frame_from_block, *parse_plain_event,
    *block_content_length, *python_check_block, *command_reply_type, *missing, *unsure,
    *search_keys, *search_keys_of, *decode_value, *array_prefix;
static Py_ssize_t default_limits[4];   /* max_frame_size, max_header_block, max_headers,
                                          max_line_length */
static PyObject *s_headers, *s_block, *s_encoded, *s_body, *s_name, *s_content_type,
    *s_reply_text, *s_check_block, *s_event_block_what, *s_outer_block_what;

#define EVENT_NAME "Event-Name: "
#define INNER_LENGTH "Content-Length: "
#define OUTER_LENGTH "Content-Length: "
#define OUTER_TYPE "\nContent-Type: "
#define REPLY_PREFIX "Content-Type: command/reply\nReply-Text: "
#define EVENT_PLAIN "text/event-plain"

/* What the framer knows of a header block it holds while its body arrives. */
enum { SHAPE_OTHER, SHAPE_TYPED, SHAPE_REPLY };

typedef struct {
    PyObject_HEAD
    Py_ssize_t max_frame_size, max_header_block, max_headers, max_line_length, check_above;
    /* The stream's unframed bytes are data[start:end]: during a feed that found nothing
       buffered, the caller's own bytes (no copy); between feeds, buf, which holds only what
       the last feed left unframed (a held call's framer holds nothing between its frames). */
    const char *data;
    char *buf;
    Py_ssize_t start, end, capacity;
    Py_ssize_t scan_from;     /* from start: a block end cannot begin before it */
    PyObject *pending;        /* a header block waiting for its body, or NULL */
    int pending_shape;
    Py_ssize_t type_at, type_len;   /* the content type's span in a pending typed block */
    Py_ssize_t body_len;
} Framer;

static PyObject *protocol_error(const char *format, ...)
{
    va_list args;
    va_start(args, format);
    PyObject *message = PyUnicode_FromFormatV(format, args);
    va_end(args);
    if (message != NULL) {
        PyErr_SetObject(ProtocolError, message);
        Py_DECREF(message);
    }
    return NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* Header-block checks: a fast yes, or the reference decides                                */
/* ---------------------------------------------------------------------------------------- */

static int is_hex(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* The first "\n\n" in p[0:n], or NULL: memchr hops from line to line (glibc's memmem is
   byte by byte for so short a needle). */
static const char *blank_line(const char *p, Py_ssize_t n)
{
    const char *end = p + n;
    for (const char *at = p; (at = memchr(at, '\n', end - at)) != NULL && at + 1 < end; at++)
        if (at[1] == '\n')
            return at;
    return NULL;
}

/* Whether p[0:n] is plain ASCII, eight bytes at a time. */
static int all_ascii(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t word;
        memcpy(&word, p + i, 8);
        if (word & 0x8080808080808080ULL)
            return 0;
    }
    for (; i < n; i++)
        if (p[i] & 0x80)
            return 0;
    return 1;
}

/* The length of the longest line of p[0:n]. */
static Py_ssize_t longest_line(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t longest = 0, start = 0;
    for (const unsigned char *at = p; (at = memchr(at, '\n', n - (at - p))) != NULL; at++) {
        if (at - p - start > longest)
            longest = at - p - start;
        start = at + 1 - p;
    }
    return n - start > longest ? n - start : longest;
}

static Py_ssize_t count_lines(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t lines = 1;
    for (const unsigned char *at = p; (at = memchr(at, '\n', n - (at - p))) != NULL; at++)
        lines++;
    return lines;
}

/* Whether p[0:n] is url-encoded as FreeSWITCH writes it: plain ASCII, every '%' the start of
   an escape (NUL is checked apart). */
static int url_encoded(const unsigned char *p, Py_ssize_t n)
{
    if (!all_ascii(p, n))
        return 0;
    for (const unsigned char *at = p; (at = memchr(at, '%', n - (at - p))) != NULL; at++)
        if (!(at + 2 < p + n && is_hex(at[1]) && is_hex(at[2])))
            return 0;
    return 1;
}

/* 1 when the block surely passes the reference check_block: within every limit, no NUL, and
   when ``encoded`` plain ASCII whose every '%' starts an escape. 0: let the reference decide.
   Whole-block scans (memchr, eight bytes at a time): events are kilobytes. */
static int surely_valid(Framer *self, const unsigned char *p, Py_ssize_t n, int encoded)
{
    if (n > self->max_header_block || memchr(p, 0, n) != NULL)
        return 0;
    if (encoded && !url_encoded(p, n))
        return 0;
    if (n > self->max_headers && count_lines(p, n) > self->max_headers)
        return 0;
    if (n > self->max_line_length && longest_line(p, n) > self->max_line_length)
        return 0;
    return 1;
}

/* The reference check on ``block``; 0 on success, -1 with its ProtocolError set. */
static int reference_check(Framer *self, PyObject *block, PyObject *what, int encoded)
{
    PyObject *result = PyObject_CallFunctionObjArgs(python_check_block, (PyObject *)self, block,
                                                    what, encoded ? Py_True : Py_False, NULL);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

static int check(Framer *self, PyObject *block, PyObject *what, int encoded)
{
    if (surely_valid(self, (const unsigned char *)PyBytes_AS_STRING(block),
                     PyBytes_GET_SIZE(block), encoded))
        return 0;
    return reference_check(self, block, what, encoded);
}

/* ---------------------------------------------------------------------------------------- */
/* Items                                                                                    */
/* ---------------------------------------------------------------------------------------- */

/* An instance of a gateway.protocol class with __slots__, made as cls.__new__(cls) makes it. */
static PyObject *bare(PyObject *type)
{
    return ((PyTypeObject *)type)->tp_alloc((PyTypeObject *)type, 0);
}

static int set_attrs(PyObject *object, PyObject **names, PyObject **values, int count)
{
    for (int i = 0; i < count; i++)
        if (PyObject_SetAttr(object, names[i], values[i]) < 0)
            return -1;
    return 0;
}

/* Frame.from_block's result for a block of the common shapes: lazy headers over the block. */
static PyObject *common_frame(PyObject *block, PyObject *body, PyObject *content_type,
                              PyObject *reply_text)
{
    PyObject *frame = bare(FrameType);
    if (frame == NULL)
        return NULL;
    PyObject *names[] = {s_headers, s_block, s_encoded, s_body, s_content_type, s_reply_text};
    PyObject *values[] = {Py_None, block, Py_False, body, content_type, reply_text};
    if (set_attrs(frame, names, values, 6) < 0) {
        Py_DECREF(frame);
        return NULL;
    }
    return frame;
}

static PyObject *decoded(const char *p, Py_ssize_t n)
{
    return PyUnicode_DecodeUTF8(p, n, "replace");
}

/* A header line's value from ``at`` to the end of its line, without trailing '\r's, decoded
   (the reference's _line_value). */
static PyObject *line_value(const char *p, Py_ssize_t n, Py_ssize_t at)
{
    const char *newline = memchr(p + at, '\n', n - at);
    Py_ssize_t end = newline ? newline - p : n;
    while (end > at && p[end - 1] == '\r')
        end--;
    return decoded(p + at, end - at);
}

/* Where the first line starting with ``line`` + 1 (a prefix after its '\n') begins, or -1
   (the reference's _line_start). */
static Py_ssize_t line_start(const char *p, Py_ssize_t n, const char *line, Py_ssize_t size)
{
    if (n >= size - 1 && memcmp(p, line + 1, size - 1) == 0)
        return 0;
    const char *at = memmem(p, n, line, size);
    return at == NULL ? -1 : at + 1 - p;
}

/* An event's inner Content-Length from its digits, or -1 when they are not plain digits (the
   reference then decides, with its own error for a bad one). */
static Py_ssize_t plain_length(const char *p, Py_ssize_t n)
{
    if (n < 1 || n > 18)
        return -1;
    Py_ssize_t value = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        value = value * 10 + (p[i] - '0');
    }
    return value;
}

/* The Event for a text/event-plain frame's body: the reference's parse_plain_event and
   Event.plain, for events as FreeSWITCH writes them (Event-Name first, a plain inner length);
   any other is the reference's to parse. */
static PyObject *plain_event(Framer *self, PyObject *data)
{
    const char *p = PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    const char *blank = blank_line(p, n);
    Py_ssize_t block_len = blank ? blank - p : n, rest_at = blank ? block_len + 2 : n;
    Py_ssize_t name_size = sizeof(EVENT_NAME) - 1, length_size = sizeof(INNER_LENGTH) - 1;
    Py_ssize_t length = 0;
    if (block_len < name_size || memcmp(p, EVENT_NAME, name_size) != 0)
        goto reference;
    /* One search: a first "Content-Length: " that does not start a line is the reference's
       to read (its line_start would look further). */
    const char *length_text = memmem(p, block_len, INNER_LENGTH, length_size);
    if (length_text != NULL && length_text != p && length_text[-1] != '\n')
        goto reference;
    if (length_text != NULL) {
        Py_ssize_t length_at = length_text - p + length_size;
        const char *newline = memchr(p + length_at, '\n', block_len - length_at);
        Py_ssize_t end = newline ? newline - p : block_len;
        while (end > length_at && p[end - 1] == '\r')
            end--;
        length = plain_length(p + length_at, end - length_at);
        if (length < 0)
            goto reference;
    }

    PyObject *block = PyBytes_FromStringAndSize(p, block_len);
    if (block == NULL)
        return NULL;
    if (check(self, block, s_event_block_what, 1) < 0) {
        Py_DECREF(block);
        return NULL;
    }
    if (length > n - rest_at)
        length = n - rest_at;
    PyObject *body = PyBytes_FromStringAndSize(p + rest_at, length);
    PyObject *name = line_value(p, block_len, name_size);
    PyObject *event = body && name ? bare(EventType) : NULL;
    if (event != NULL) {
        PyObject *names[] = {s_headers, s_block, s_encoded, s_body, s_name};
        PyObject *values[] = {Py_None, block, Py_True, body, name};
        if (set_attrs(event, names, values, 5) < 0)
            Py_CLEAR(event);
    }
    Py_DECREF(block);
    Py_XDECREF(body);
    Py_XDECREF(name);
    return event;

reference:;
    PyObject *checker = PyObject_GetAttr((PyObject *)self, s_check_block);
    if (checker == NULL)
        return NULL;
    PyObject *parsed = PyObject_CallFunctionObjArgs(parse_plain_event, data, checker, NULL);
    Py_DECREF(checker);
    return parsed;
}

enum { NO_LENGTH = -2, UNSURE = -3 };

/* Whether the line of p[0:n] at ``at`` is a header of its own ("name: value"), as the
   reference's split sees it, or may be the previous value's continuation. */
static int header_line(const char *p, Py_ssize_t n, Py_ssize_t at)
{
    const char *newline = memchr(p + at, '\n', n - at);
    Py_ssize_t end = newline ? newline - p : n;
    for (Py_ssize_t i = at; i + 1 < end; i++)
        if (p[i] == ':' && p[i + 1] == ' ')
            return 1;
    return 0;
}

/* The Content-Length of a block of no common shape (the connect reply, a disconnect notice):
   its value, NO_LENGTH when it surely has none, or UNSURE when only the reference's header
   split settles it (a '\r', a byte beyond ASCII, the name twice or in another case, a value
   that is not plain digits or may go on over the next line, one over the frame limit). */
static Py_ssize_t other_length(Framer *self, const char *p, Py_ssize_t n)
{
    static const char name[] = "content-length:", exact[] = "Content-Length: ";
    Py_ssize_t size = sizeof(name) - 1, found = -1;
    if (memchr(p, '\r', n) != NULL || !all_ascii((const unsigned char *)p, n))
        return UNSURE;
    for (const char *line = p; line != NULL; ) {
        if (p + n - line >= size && strncasecmp(line, name, size) == 0) {
            if (found >= 0)
                return UNSURE;
            found = line - p;
        }
        line = memchr(line, '\n', p + n - line);
        line = line ? line + 1 : NULL;
    }
    if (found < 0)
        return NO_LENGTH;
    Py_ssize_t at = found + sizeof(exact) - 1;
    if (n < at || memcmp(p + found, exact, sizeof(exact) - 1) != 0)
        return UNSURE;
    const char *newline = memchr(p + at, '\n', n - at);
    Py_ssize_t end = newline ? newline - p : n;
    if (newline != NULL && !header_line(p, n, end + 1))
        return UNSURE;
    Py_ssize_t length = plain_length(p + at, end - at);
    return length < 0 || length > self->max_frame_size ? UNSURE : length;
}

/* Frame.from_block's result for a block of no common shape, or NULL with no error set when
   only the reference can build it (channel data not url-encoded as FreeSWITCH writes it, no
   Content-Type line in that case). */
static PyObject *other_frame(PyObject *block, PyObject *body)
{
    const char *p = PyBytes_AS_STRING(block);
    Py_ssize_t n = PyBytes_GET_SIZE(block);
    /* The connect reply is a serialised CHANNEL_DATA event: url-encoded, checked once here. */
    int encoded = body == Py_None && line_start(p, n, "\nEvent-Name: ", 13) >= 0;
    if (encoded && !url_encoded((const unsigned char *)p, n))
        return NULL;
    Py_ssize_t type_at = line_start(p, n, "\nContent-Type: ", 15);
    if (type_at < 0)
        return NULL;
    PyObject *content_type = line_value(p, n, type_at + 14);
    if (content_type == NULL)
        return NULL;
    PyObject *frame = bare(FrameType);
    if (frame != NULL) {
        PyObject *names[] = {s_headers, s_block, s_encoded, s_body, s_content_type,
                             s_reply_text};
        PyObject *values[] = {Py_None, block, encoded ? Py_True : Py_False, body,
                              content_type, Py_None};
        if (set_attrs(frame, names, values, 6) < 0)
            Py_CLEAR(frame);
    }
    Py_DECREF(content_type);
    return frame;
}

/* The frame for a block of no common shape and its body (None when it has no length). */
static PyObject *any_frame(PyObject *block, PyObject *body)
{
    PyObject *frame = other_frame(block, body);
    if (frame != NULL || PyErr_Occurred())
        return frame;
    return PyObject_CallFunctionObjArgs(frame_from_block, block, body, Py_None, NULL);
}

/* The item for a typed block (an event, api response or log line) and its body. */
static PyObject *typed_item(Framer *self, PyObject *block, PyObject *body, Py_ssize_t type_at,
                            Py_ssize_t type_len)
{
    const char *type = PyBytes_AS_STRING(block) + type_at;
    if (type_len == sizeof(EVENT_PLAIN) - 1 && memcmp(type, EVENT_PLAIN, type_len) == 0)
        return plain_event(self, body);
    PyObject *content_type = decoded(type, type_len);
    if (content_type == NULL)
        return NULL;
    PyObject *frame = common_frame(block, body, content_type, Py_None);
    Py_DECREF(content_type);
    return frame;
}

/* ---------------------------------------------------------------------------------------- */
/* The framer                                                                               */
/* ---------------------------------------------------------------------------------------- */

/* Make buf hold ``size`` bytes at least. */
static int reserve(Framer *self, Py_ssize_t size)
{
    if (size <= self->capacity)
        return 0;
    Py_ssize_t capacity = self->capacity > size / 2 ? 2 * self->capacity : size;
    char *buf = PyMem_Realloc(self->buf, capacity);
    if (buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->buf = buf;
    self->capacity = capacity;
    return 0;
}

/* After a feed: keep what was not framed in buf (moved to its front), and no more memory than
   that takes; nothing at all when everything was framed. */
static int keep_rest(Framer *self)
{
    Py_ssize_t rest = self->end - self->start;
    if (rest == 0) {
        PyMem_Free(self->buf);
        self->buf = NULL;
        self->capacity = 0;
    }
    else if (self->data == self->buf)
        memmove(self->buf, self->buf + self->start, rest);
    else if (reserve(self, rest) == 0)
        memcpy(self->buf, self->data + self->start, rest);
    else
        rest = 0;   /* no memory: the error is set, and the call ends */
    self->data = self->buf;
    self->start = 0;
    self->end = rest;
    return PyErr_Occurred() ? -1 : 0;
}

/* The end of the next header block from scan_from: [*start, *stop) is "\n\n", or "\n\r*\n"
   when a '\r' comes first (FreeSWITCH's own rule); 0 when there is none yet. */
static int block_end(const char *b, Py_ssize_t n, Py_ssize_t from, Py_ssize_t *start,
                     Py_ssize_t *stop)
{
    const char *blank = blank_line(b + from, n - from);
    Py_ssize_t found = blank ? blank - b : -1;
    Py_ssize_t until = found >= 0 ? found : n;
    if (memchr(b + from, '\r', until - from) == NULL) {
        *start = found, *stop = found + 2;
        return found >= 0;
    }
    for (const char *at = b + from; (at = memchr(at, '\n', n - (at - b))) != NULL; at++) {
        const char *next = at + 1;
        while (next < b + n && *next == '\r')
            next++;
        if (next < b + n && *next == '\n') {
            *start = at - b, *stop = next + 1 - b;
            return 1;
        }
    }
    return 0;
}

/* The shape of a header block, as the reference's _COMMON_OUTER regex matches it whole. */
static int shape_of(const char *p, Py_ssize_t n, Py_ssize_t *digits_at, Py_ssize_t *digits_len,
                    Py_ssize_t *value_at)
{
    Py_ssize_t prefix = sizeof(OUTER_LENGTH) - 1, type = sizeof(OUTER_TYPE) - 1,
               reply = sizeof(REPLY_PREFIX) - 1;
    Py_ssize_t i;
    if (n >= prefix && memcmp(p, OUTER_LENGTH, prefix) == 0) {
        for (i = prefix; i < n && p[i] >= '0' && p[i] <= '9'; i++)
            ;
        if (i == prefix || n - i < type || memcmp(p + i, OUTER_TYPE, type) != 0)
            return SHAPE_OTHER;
        *digits_at = prefix, *digits_len = i - prefix, *value_at = i + type;
    }
    else if (n >= reply && memcmp(p, REPLY_PREFIX, reply) == 0)
        *value_at = reply;
    else
        return SHAPE_OTHER;
    for (i = *value_at; i < n; i++)
        if (p[i] == '\r' || p[i] == '\n')
            return SHAPE_OTHER;
    return *value_at == reply ? SHAPE_REPLY : SHAPE_TYPED;
}

/* A typed block's Content-Length, checked against the frame limit as the reference does. */
static Py_ssize_t outer_length(Framer *self, const char *digits, Py_ssize_t size)
{
    while (size > 1 && *digits == '0')
        digits++, size--;
    Py_ssize_t length = plain_length(digits, size);
    if (length >= 0 && length <= self->max_frame_size)
        return length;
    PyObject *text = PyUnicode_FromStringAndSize(digits, size);
    if (text != NULL) {
        protocol_error("Content-Length %U exceeds the %zd-byte limit", text,
                       self->max_frame_size);
        Py_DECREF(text);
    }
    return -1;
}

/* The next header block and what follows from it: appends an item to ``out``, or leaves the
   block pending for its body. 1: go on; 0: no whole block buffered; -1: error. */
static int take_block(Framer *self, PyObject *out)
{
    const char *b = self->data + self->start;
    Py_ssize_t n = self->end - self->start;
    if (n > 0 && (b[0] == '\n' || b[0] == '\r')) {   /* blank lines between blocks: noise */
        Py_ssize_t skip = 0;
        while (skip < n && (b[skip] == '\n' || b[skip] == '\r'))
            skip++;
        self->start += skip, b += skip, n -= skip;
        self->scan_from = 0;
    }
    Py_ssize_t start, stop;
    if (!block_end(b, n, self->scan_from, &start, &stop)) {
        if (n > self->max_header_block) {
            protocol_error("header block exceeds %zd bytes without ending",
                           self->max_header_block);
            return -1;
        }
        Py_ssize_t last = n;
        while (last > 0 && b[last - 1] != '\n')
            last--;
        self->scan_from = last > 0 ? last - 1 : 0;
        return 0;
    }
    PyObject *block = PyBytes_FromStringAndSize(b, start);
    if (block == NULL)
        return -1;
    self->start += stop;
    self->scan_from = 0;
    if (check(self, block, s_outer_block_what, 0) < 0)
        goto fail;
    const char *p = PyBytes_AS_STRING(block);
    Py_ssize_t digits_at = 0, digits_len = 0, value_at = 0, length;
    int shape = shape_of(p, start, &digits_at, &digits_len, &value_at);
    PyObject *item = NULL;
    if (shape == SHAPE_REPLY) {
        PyObject *text = decoded(p + value_at, start - value_at);
        if (text == NULL)
            goto fail;
        item = common_frame(block, Py_None, command_reply_type, text);
        Py_DECREF(text);
    }
    else {
        if (shape == SHAPE_TYPED)
            length = outer_length(self, p + digits_at, digits_len);
        else if ((length = other_length(self, p, start)) == UNSURE) {
            PyObject *value = PyObject_CallFunction(block_content_length, "On", block,
                                                    self->max_frame_size);
            if (value == NULL)
                goto fail;
            length = value == Py_None ? NO_LENGTH : PyLong_AsSsize_t(value);
            Py_DECREF(value);
        }
        if (length == -1)
            goto fail;
        if (length >= 0) {   /* its body follows */
            self->pending = block;
            self->pending_shape = shape;
            self->type_at = value_at, self->type_len = start - value_at;
            self->body_len = length;
            return 1;
        }
        item = any_frame(block, Py_None);
    }
    if (item == NULL || PyList_Append(out, item) < 0)
        goto fail_item;
    Py_DECREF(item);
    Py_DECREF(block);
    return 1;
fail_item:
    Py_XDECREF(item);
fail:
    Py_DECREF(block);
    return -1;
}

/* The pending block's body, if buffered whole: appends its item. 1: go on; 0: not yet. */
static int take_body(Framer *self, PyObject *out)
{
    if (self->end - self->start < self->body_len)
        return 0;
    PyObject *body = PyBytes_FromStringAndSize(self->data + self->start, self->body_len);
    if (body == NULL)
        return -1;
    self->start += self->body_len;
    PyObject *block = self->pending;
    self->pending = NULL;
    PyObject *item = self->pending_shape == SHAPE_TYPED
        ? typed_item(self, block, body, self->type_at, self->type_len)
        : any_frame(block, body);
    Py_DECREF(block);
    Py_DECREF(body);
    if (item == NULL)
        return -1;
    int failed = PyList_Append(out, item);
    Py_DECREF(item);
    return failed ? -1 : 1;
}

static PyObject *Framer_feed(Framer *self, PyObject *data)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (self->start == self->end) {   /* nothing buffered: frame the caller's bytes in place */
        self->data = view.buf;
        self->start = 0;
        self->end = view.len;
    }
    else if (reserve(self, self->end + view.len) == 0) {
        memcpy(self->buf + self->end, view.buf, view.len);
        self->data = self->buf;
        self->end += view.len;
    }
    else {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *out = PyList_New(0);
    int step = out == NULL ? -1 : 1;
    while (step > 0)
        step = self->pending == NULL ? take_block(self, out) : take_body(self, out);
    /* Before the caller's bytes are let go, whatever the outcome: data must not point there. */
    if (keep_rest(self) < 0)
        step = -1;
    PyBuffer_Release(&view);
    if (step < 0) {
        Py_XDECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *Framer_check_block(Framer *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"block", "what", "encoded", NULL};
    PyObject *block, *what = s_outer_block_what;
    int encoded = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "S|Up:check_block", keywords, &block, &what,
                                     &encoded))
        return NULL;
    if (check(self, block, what, encoded) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Framer_buffered(Framer *self, PyObject *Py_UNUSED(ignored))
{
    const char *b = self->data + self->start;
    Py_ssize_t n = self->end - self->start;
    if (self->pending == NULL)
        return PyBytes_FromStringAndSize(b, n);
    Py_ssize_t size = PyBytes_GET_SIZE(self->pending);
    PyObject *result = PyBytes_FromStringAndSize(NULL, size + 2 + n);
    if (result == NULL)
        return NULL;
    char *to = PyBytes_AS_STRING(result);
    memcpy(to, PyBytes_AS_STRING(self->pending), size);
    memcpy(to + size, "\n\n", 2);
    if (n > 0)
        memcpy(to + size + 2, b, n);
    return result;
}

static PyObject *Framer_mid_frame(Framer *self, void *Py_UNUSED(closure))
{
    if (self->pending != NULL)
        Py_RETURN_TRUE;
    for (Py_ssize_t i = self->start; i < self->end; i++)
        if (self->data[i] != '\r' && self->data[i] != '\n')
            Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static int Framer_init(Framer *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"max_frame_size", "max_header_block", "max_headers",
                               "max_line_length", NULL};
    if (EventType == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "gateway._framer is used before bind()");
        return -1;
    }
    Py_ssize_t limits[4];
    memcpy(limits, default_limits, sizeof(limits));
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|nnnn:SessionParser", keywords, &limits[0],
                                     &limits[1], &limits[2], &limits[3]))
        return -1;
    self->max_frame_size = limits[0];
    self->max_header_block = limits[1] < limits[0] ? limits[1] : limits[0];   /* part of one */
    self->max_headers = limits[2];
    self->max_line_length = limits[3];
    Py_ssize_t above = self->max_header_block;
    above = self->max_headers < above ? self->max_headers : above;
    self->check_above = self->max_line_length < above ? self->max_line_length : above;
    self->start = self->end = self->scan_from = 0;
    Py_CLEAR(self->pending);
    return 0;
}

static void Framer_dealloc(Framer *self)
{
    Py_XDECREF(self->pending);
    PyMem_Free(self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Framer_sizeof(Framer *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(Py_TYPE(self)->tp_basicsize + self->capacity);
}

static PyMethodDef Framer_methods[] = {
    {"__sizeof__", (PyCFunction)Framer_sizeof, METH_NOARGS,
     "The framer's size in memory, its buffer included."},
    {"feed", (PyCFunction)Framer_feed, METH_O,
     "Feed bytes; returns the frames (and plain events, as Event) they complete."},
    {"check_block", (PyCFunction)(void (*)(void))Framer_check_block,
     METH_VARARGS | METH_KEYWORDS,
     "check_block(block, what='header block', encoded=False): raise ProtocolError for a "
     "header block over a limit, or one FreeSWITCH cannot have written."},
    {"buffered", (PyCFunction)Framer_buffered, METH_NOARGS,
     "The bytes fed but not yet returned as frames."},
    {NULL}};

static PyGetSetDef Framer_getset[] = {
    {"mid_frame", (getter)Framer_mid_frame, NULL,
     "True while part of a frame is buffered (EOF now would cut it).", NULL},
    {NULL}};

static PyMemberDef Framer_members[] = {
    {"max_frame_size", T_PYSSIZET, offsetof(Framer, max_frame_size), READONLY, NULL},
    {"max_header_block", T_PYSSIZET, offsetof(Framer, max_header_block), READONLY, NULL},
    {"max_headers", T_PYSSIZET, offsetof(Framer, max_headers), READONLY, NULL},
    {"max_line_length", T_PYSSIZET, offsetof(Framer, max_line_length), READONLY, NULL},
    {"_check_above", T_PYSSIZET, offsetof(Framer, check_above), READONLY, NULL},
    {NULL}};

static PyTypeObject FramerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway._framer.SessionParser",
    .tp_basicsize = sizeof(Framer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,   /* a benchmark app times feed() */
    .tp_doc = "FreeSWITCH -> a session: gateway.protocol.PySessionParser, in C.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Framer_init,
    .tp_dealloc = (destructor)Framer_dealloc,
    .tp_methods = Framer_methods,
    .tp_getset = Framer_getset,
    .tp_members = Framer_members,
};

/* ---------------------------------------------------------------------------------------- */
/* The module                                                                               */
/* ---------------------------------------------------------------------------------------- */

static PyObject *bind(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *objects[14];
    if (!PyArg_ParseTuple(args, "OOOOOOOU(nnnn)OOO!OOU:bind", &objects[0], &objects[1],
                          &objects[2], &objects[3], &objects[4], &objects[5], &objects[6],
                          &objects[7], &default_limits[0], &default_limits[1],
                          &default_limits[2], &default_limits[3], &objects[8], &objects[9],
                          &PyDict_Type, &objects[10], &objects[11], &objects[12],
                          &objects[13]))
        return NULL;
    PyObject **slots[] = {&ProtocolError, &EventType, &FrameType, &frame_from_block,
                          &parse_plain_event, &block_content_length, &python_check_block,
                          &command_reply_type, &missing, &unsure, &search_keys,
                          &search_keys_of, &decode_value, &array_prefix};
    for (int i = 0; i < 14; i++) {
        Py_INCREF(objects[i]);
        Py_XSETREF(*slots[i], objects[i]);
    }
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------- */
/* Header search in an unsplit block                                                        */
/* ---------------------------------------------------------------------------------------- */

/* Whether the line at ``at`` is a header of its own as the reference's split sees it: it has
   ": ", or it is "name:" alone (one ':' that ends it). */
static int own_header_line(const char *p, Py_ssize_t n, Py_ssize_t at)
{
    const char *newline = memchr(p + at, '\n', n - at);
    Py_ssize_t end = newline ? newline - p : n, colons = 0;
    if (header_line(p, n, at))
        return 1;
    for (Py_ssize_t i = at; i < end; i++)
        colons += p[i] == ':';
    return end > at && p[end - 1] == ':' && colons == 1;
}

/* Whether a line of p[0:n] starts with ``key`` in any ASCII case. */
static int any_case_line(const char *p, Py_ssize_t n, const char *key, Py_ssize_t size)
{
    for (const char *line = p; line != NULL; ) {
        if (p + n - line >= size && strncasecmp(line, key, size) == 0)
            return 1;
        line = memchr(line, '\n', p + n - line);
        line = line ? line + 1 : NULL;
    }
    return 0;
}

/* gateway.protocol._py_search_block's answer for p[0:n]: a new reference to the value (str),
   to ``missing`` or to ``unsure``. */
static PyObject *search(const char *p, Py_ssize_t n, const char *prefix, Py_ssize_t size,
                        const char *lowered, Py_ssize_t lowered_size)
{
    if (size == 0 || memchr(p, '\r', n) != NULL)
        return Py_NewRef(unsure);
    Py_ssize_t at = -1;
    if (n >= size && memcmp(p, prefix, size) == 0)
        at = 0;
    else
        for (const char *hit = p; (hit = memmem(hit, p + n - hit, prefix, size)) != NULL; hit++)
            if (hit[-1] == '\n') {
                at = hit - p;
                break;
            }
    if (at < 0) {
        int absent = all_ascii((const unsigned char *)p, n) &&
                     !any_case_line(p, n, lowered, lowered_size);
        return Py_NewRef(absent ? missing : unsure);
    }
    /* Repeated, perhaps as "Name:" (the last one wins)? */
    for (const char *hit = p + at; (hit = memmem(hit, p + n - hit, prefix, size - 1)) != NULL;
         hit++)
        if (hit > p && hit[-1] == '\n' && hit - 1 >= p + at)
            return Py_NewRef(unsure);
    const char *newline = memchr(p + at, '\n', n - at);
    if (newline != NULL && !own_header_line(p, n, newline + 1 - p))
        return Py_NewRef(unsure);
    Py_ssize_t end = newline ? newline - p : n;
    return decoded(p + at + size, end - at - size);
}

/* gateway.protocol._py_search_block, in C: the same answers, searched faster. */
static PyObject *search_block(PyObject *Py_UNUSED(module), PyObject *const *args,
                              Py_ssize_t nargs)
{
    if (nargs != 3 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1]) ||
        !PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "search_block(block, prefix, lowered): three bytes");
        return NULL;
    }
    return search(PyBytes_AS_STRING(args[0]), PyBytes_GET_SIZE(args[0]),
                  PyBytes_AS_STRING(args[1]), PyBytes_GET_SIZE(args[1]),
                  PyBytes_AS_STRING(args[2]), PyBytes_GET_SIZE(args[2]));
}

static int hex_value(unsigned char c)
{
    return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
}

/* What urllib.parse.unquote(value, errors="replace") makes of an ASCII ``value``: each "%XX"
   the byte it stands for ("%" not followed by two hex digits stays), the bytes then decoded as
   UTF-8, an invalid sequence as U+FFFD. (The channel data's values: a caller ID "%2B...".) */
static PyObject *percent_decoded(PyObject *value)
{
    const unsigned char *p = PyUnicode_1BYTE_DATA(value);
    Py_ssize_t n = PyUnicode_GET_LENGTH(value), size = 0;
    char *bytes = PyMem_Malloc(n > 0 ? n : 1);
    if (bytes == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] == '%' && i + 2 < n && is_hex(p[i + 1]) && is_hex(p[i + 2])) {
            bytes[size++] = (char)(hex_value(p[i + 1]) << 4 | hex_value(p[i + 2]));
            i += 2;
        }
        else
            bytes[size++] = (char)p[i];
    }
    PyObject *text = PyUnicode_DecodeUTF8(bytes, size, "replace");
    PyMem_Free(bytes);
    return text;
}

/* gateway.protocol._py_lookup_block, in C: a header's value as handed out (url-decoded, arrays
   split: the reference's _decode_value, called only for values that need it), ``default`` when
   absent, ``unsure`` when only the header split can tell. One call per lookup from Python,
   where the search, its cached keys and the decoding took four. */
static PyObject *lookup_block(PyObject *Py_UNUSED(module), PyObject *const *args,
                              Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_Check(args[0]) || !PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "lookup_block(block, name, encoded, default)");
        return NULL;
    }
    PyObject *block = args[0], *name = args[1], *encoded = args[2];
    PyObject *keys = PyDict_GetItemWithError(search_keys, name);
    if (keys != NULL)
        Py_INCREF(keys);
    else if (PyErr_Occurred() || (keys = PyObject_CallOneArg(search_keys_of, name)) == NULL)
        return NULL;
    if (!PyTuple_CheckExact(keys) || PyTuple_GET_SIZE(keys) != 2 ||
        !PyBytes_Check(PyTuple_GET_ITEM(keys, 0)) || !PyBytes_Check(PyTuple_GET_ITEM(keys, 1))) {
        Py_DECREF(keys);
        PyErr_SetString(PyExc_TypeError, "search keys must be a (prefix, lowered) pair");
        return NULL;
    }
    PyObject *prefix = PyTuple_GET_ITEM(keys, 0), *lowered = PyTuple_GET_ITEM(keys, 1);
    PyObject *value = search(PyBytes_AS_STRING(block), PyBytes_GET_SIZE(block),
                             PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix),
                             PyBytes_AS_STRING(lowered), PyBytes_GET_SIZE(lowered));
    Py_DECREF(keys);
    if (value == NULL || value == unsure)
        return value;
    if (value == missing) {
        Py_DECREF(value);
        return Py_NewRef(args[3]);
    }
    Py_ssize_t length = PyUnicode_GET_LENGTH(value);
    if (PyObject_IsTrue(encoded) && PyUnicode_FindChar(value, '%', 0, length, 1) >= 0) {
        PyObject *unescaped = PyUnicode_IS_ASCII(value) ? percent_decoded(value) : NULL;
        if (unescaped == NULL && PyErr_Occurred()) {
            Py_DECREF(value);
            return NULL;
        }
        if (unescaped != NULL && PyUnicode_Tailmatch(unescaped, array_prefix, 0,
                                                     PY_SSIZE_T_MAX, -1) != 1) {
            Py_DECREF(value);
            return unescaped;
        }
        Py_XDECREF(unescaped);   /* an array, or beyond ASCII: the reference decodes it */
    }
    else if (PyUnicode_Tailmatch(value, array_prefix, 0, length, -1) != 1)
        return value;
    PyObject *result = PyObject_CallFunctionObjArgs(decode_value, value, encoded, NULL);
    Py_DECREF(value);
    return result;
}

static PyMethodDef module_methods[] = {
    {"search_block", (PyCFunction)(void (*)(void))search_block, METH_FASTCALL,
     "search_block(block, prefix, lowered): gateway.protocol._py_search_block, in C."},
    {"lookup_block", (PyCFunction)(void (*)(void))lookup_block, METH_FASTCALL,
     "lookup_block(block, name, encoded, default): gateway.protocol._py_lookup_block, in C."},
    {"bind", bind, METH_VARARGS,
     "bind(ProtocolError, Event, Frame, Frame.from_block, parse_plain_event, "
     "block_content_length, check_block, 'command/reply', default limits, _MISSING, "
     "_UNSURE, the search keys' cache and its filler, _decode_value, 'ARRAY::'): the reference "
     "classes and functions this framer builds with and defers to."},
    {NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "gateway._framer",
                                    "The session's framer in C (see gateway.protocol).", -1,
                                    module_methods};

PyMODINIT_FUNC PyInit__framer(void)
{
    struct { PyObject **slot; const char *text; } names[] = {
        {&s_headers, "_headers"}, {&s_block, "_block"}, {&s_encoded, "_encoded"},
        {&s_body, "body"}, {&s_name, "name"}, {&s_content_type, "content_type"},
        {&s_reply_text, "_reply_text"}, {&s_check_block, "check_block"},
        {&s_event_block_what, "event header block"}, {&s_outer_block_what, "header block"}};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if ((*names[i].slot = PyUnicode_InternFromString(names[i].text)) == NULL)
            return NULL;
    if (PyType_Ready(&FramerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FramerType);
    if (PyModule_AddObject(m, "SessionParser", (PyObject *)&FramerType) < 0) {
        Py_DECREF(&FramerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
