/* The media phase of bench/lean_load.py's generator, in C: Twilio Media Streams frames on sockets that
 * Python has already set up (signed webhook, WebSocket upgrade, `connected` + `start`) and handed over
 * with SCM_RIGHTS. Why C: in Python (raw asyncio sockets on uvloop) the generator costs ~0.37 of a
 * bridge worker's CPU per stream, in C ~0.19, most of it the kernel's loopback TCP (bench/README.md).
 *
 *   lean_media CONTROL_FD PAYLOADS_FILE PHASES
 *
 * CONTROL_FD: a SOCK_SEQPACKET socket. Messages: "ADD <streamSid> <keep_audio 0|1> <callSid> <accountSid>" with the stream's
 * socket attached; "STOP" (no more media frames); "END <out file>" (send `stop` + a close frame on every
 * stream, wait up to 2 s for the server's close, write the results, exit).
 * PAYLOADS_FILE: the caller's frames, base64, one per line; stream frame k carries line k % lines.
 * Every 20/PHASES ms one timer slot sends the next frame of every stream in that slot (stream i is in
 * slot i % PHASES), then reads every socket that has data (one epoll pass per tick, not one wake-up per
 * message; receive times are the kernel's, SO_TIMESTAMPNS). Receive: walks WebSocket frame headers; a
 * media message counts base64 length (no decode, except for keep_audio streams); marks are echoed once
 * the audio before them has played, `clear` returns pending marks at once; anything else is a bad frame.
 * Results (little-endian): u32 streams; per stream: u32 sid length, sid, i64 bad frames, media messages,
 * close code, marks echoed; u64 n + n doubles (send time of frame k); u64 n + n (double receive time,
 * i64 cumulative bytes heard); u64 n + n bytes of heard u-law (keep_audio only). Times: CLOCK_MONOTONIC s.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define FRAME_MS 20
#define CONTROL_TAG UINT64_MAX
#define TIMER_TAG (UINT64_MAX - 1)

typedef struct { double t; int64_t end; } Recv;
typedef struct { char name[256]; double due; } Mark;

typedef struct {
    int fd, open, keep;
    char sid[80], call[80], account[80];
    size_t sidlen;
    uint64_t seq, chunk;
    double *sent; size_t nsent, capsent;
    Recv *recv; size_t nrecv, caprecv;
    int64_t heard, bad, media, close_code, marks_echoed;
    unsigned char *in; size_t inlen, incap;
    unsigned char *out; size_t outlen, outcap;
    double playout_end;
    Mark *marks; size_t nmarks, capmarks;
    unsigned char *audio; size_t alen, acap;
} Stream;

static Stream **streams;
static size_t nstreams, capstreams;
static char **payloads;
static size_t npayloads;
static int epfd, sockets_ep;  /* control + timer (blocking waits); the streams' sockets (polled at each tick) */
static double real_minus_mono;  /* CLOCK_REALTIME - CLOCK_MONOTONIC: kernel receive timestamps are realtime */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *grow(void *p, size_t *cap, size_t need, size_t item) {
    if (need <= *cap) return p;
    size_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    p = realloc(p, c * item);
    if (!p) { perror("realloc"); exit(3); }
    *cap = c;
    return p;
}

static void stream_close(Stream *s) {
    if (!s->open) return;
    epoll_ctl(sockets_ep, EPOLL_CTL_DEL, s->fd, NULL);
    close(s->fd);
    s->open = 0;
}

static void flush_out(Stream *s) {
    while (s->open && s->outlen) {
        ssize_t n = send(s->fd, s->out, s->outlen, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;  /* kept; tried again on the next send */
            stream_close(s);
            return;
        }
        memmove(s->out, s->out + n, s->outlen - (size_t)n);
        s->outlen -= (size_t)n;
    }
}

static void send_raw(Stream *s, const unsigned char *data, size_t len) {
    if (!s->open) return;
    if (!s->outlen) {
        ssize_t n = send(s->fd, data, len, MSG_NOSIGNAL);
        if (n == (ssize_t)len) return;
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) { stream_close(s); return; }
            n = 0;
        }
        data += n;
        len -= (size_t)n;
    }
    s->out = grow(s->out, &s->outcap, s->outlen + len, 1);
    memcpy(s->out + s->outlen, data, len);
    s->outlen += len;
    flush_out(s);
}

/* one client frame, masking key 0 (the payload goes out as is) */
static void send_frame(Stream *s, int opcode, const char *payload, size_t len) {
    unsigned char buf[16 + 4096];
    size_t h = 0;
    if (len > 4096) return;
    buf[h++] = 0x80 | opcode;
    if (len < 126) buf[h++] = 0x80 | len;
    else { buf[h++] = 0x80 | 126; buf[h++] = len >> 8; buf[h++] = len & 0xff; }
    memset(buf + h, 0, 4); h += 4;
    memcpy(buf + h, payload, len);
    send_raw(s, buf, h + len);
}

static void send_media(Stream *s, double t) {
    char text[4096];
    uint64_t k = s->chunk++;
    int n = snprintf(text, sizeof text,
                     "{\"event\":\"media\",\"sequenceNumber\":\"%llu\",\"media\":{\"track\":\"inbound\",\"chunk\":\"%llu\","
                     "\"timestamp\":\"%llu\",\"payload\":\"%s\"},\"streamSid\":\"%s\"}",
                     (unsigned long long)s->seq++, (unsigned long long)k + 1, (unsigned long long)k * FRAME_MS,
                     payloads[k % npayloads], s->sid);
    s->sent = grow(s->sent, &s->capsent, s->nsent + 1, sizeof(double));
    s->sent[s->nsent++] = t;
    send_frame(s, 1, text, (size_t)n);
}

static void echo_mark(Stream *s, const char *name) {
    char text[512];
    int n = snprintf(text, sizeof text, "{\"event\":\"mark\",\"sequenceNumber\":\"%llu\",\"streamSid\":\"%s\",\"mark\":{\"name\":\"%s\"}}",
                     (unsigned long long)s->seq++, s->sid, name);
    send_frame(s, 1, text, (size_t)n);
    s->marks_echoed++;
}

static void due_marks(Stream *s, double t, int all) {
    size_t kept = 0;
    for (size_t i = 0; i < s->nmarks; i++) {
        if (all || s->marks[i].due <= t) echo_mark(s, s->marks[i].name);
        else s->marks[kept++] = s->marks[i];
    }
    s->nmarks = kept;
}

static int b64val(unsigned char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

static void keep_audio(Stream *s, const unsigned char *p, size_t n) {
    s->audio = grow(s->audio, &s->acap, s->alen + n, 1);
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int v = b64val(p[i]);
        if (v < 0) continue;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) { bits -= 8; s->audio[s->alen++] = (acc >> bits) & 0xff; }
    }
}

static const unsigned char *find(const unsigned char *hay, size_t n, const char *needle) {
    return memmem(hay, n, needle, strlen(needle));
}

static void on_text(Stream *s, const unsigned char *p, size_t n, double t) {
    const unsigned char *key = find(p, n, "\"payload\"");
    if (key && find(p, (size_t)(key - p), "\"media\"")) {
        const unsigned char *end = p + n;
        const unsigned char *q1 = memchr(key + 9, '"', (size_t)(end - key - 9));
        const unsigned char *q2 = q1 ? memchr(q1 + 1, '"', (size_t)(end - q1 - 1)) : NULL;
        if (!q2 || !memmem(p, n, s->sid, s->sidlen)) { s->bad++; return; }
        size_t enc = (size_t)(q2 - q1 - 1);
        size_t size = enc / 4 * 3 - (enc >= 1 && q2[-1] == '=') - (enc >= 2 && q2[-2] == '=');
        if (s->keep) keep_audio(s, q1 + 1, enc);
        s->media++;
        s->heard += (int64_t)size;
        s->recv = grow(s->recv, &s->caprecv, s->nrecv + 1, sizeof(Recv));
        s->recv[s->nrecv++] = (Recv){t, s->heard};
        s->playout_end = (s->playout_end > t ? s->playout_end : t) + size / 8000.0;
        return;
    }
    if (!memmem(p, n, s->sid, s->sidlen)) { s->bad++; return; }
    if (find(p, n, "\"event\":\"mark\"") || find(p, n, "\"event\": \"mark\"")) {
        const unsigned char *nm = find(p, n, "\"name\"");
        const unsigned char *q1 = nm ? memchr(nm + 6, '"', (size_t)(p + n - nm - 6)) : NULL;
        const unsigned char *q2 = q1 ? memchr(q1 + 1, '"', (size_t)(p + n - q1 - 1)) : NULL;
        if (!q2 || q2 - q1 - 1 >= 255) { s->bad++; return; }
        s->marks = grow(s->marks, &s->capmarks, s->nmarks + 1, sizeof(Mark));
        Mark *m = &s->marks[s->nmarks++];
        memcpy(m->name, q1 + 1, (size_t)(q2 - q1 - 1));
        m->name[q2 - q1 - 1] = 0;
        m->due = s->playout_end > t ? s->playout_end : t;
    } else if (find(p, n, "\"event\":\"clear\"") || find(p, n, "\"event\": \"clear\"")) {
        s->playout_end = t;
        due_marks(s, t, 1);  /* Twilio returns pending marks when the buffer is cleared */
    } else {
        s->bad++;
    }
}

static void walk(Stream *s, double t) {
    size_t pos = 0;
    unsigned char *b = s->in;
    while (s->inlen - pos >= 2) {
        unsigned b0 = b[pos], b1 = b[pos + 1];
        uint64_t n = b1 & 0x7f;
        size_t start = pos + 2;
        if (n == 126) {
            if (s->inlen - pos < 4) break;
            n = ((uint64_t)b[pos + 2] << 8) | b[pos + 3];
            start = pos + 4;
        } else if (n == 127) {
            if (s->inlen - pos < 10) break;
            n = 0;
            for (int i = 0; i < 8; i++) n = (n << 8) | b[pos + 2 + i];
            start = pos + 10;
        }
        if (b1 & 0x80) { s->bad++; start += 4; }  /* a server never masks */
        if (start + n > s->inlen) break;
        int op = b0 & 0x0f;
        if (op == 1 && (b0 & 0x80)) on_text(s, b + start, n, t);
        else if (op == 9) send_frame(s, 10, (const char *)b + start, n);
        else if (op == 8) {
            s->close_code = n >= 2 ? (b[start] << 8 | b[start + 1]) : 1005;
            send_frame(s, 8, (const char *)b + start, n >= 2 ? 2 : 0);
            stream_close(s);
            return;
        } else if (op != 10) s->bad++;  /* binary or fragmented: Twilio's protocol has neither */
        pos = start + n;
    }
    if (pos) { memmove(b, b + pos, s->inlen - pos); s->inlen -= pos; }
}

/* Reads what is there; `t` = the kernel's receive time of the last segment read (SO_TIMESTAMPNS), so
 * polling the sockets only at the timer ticks costs no accuracy (`fallback`: when the kernel gives none). */
static void on_readable(Stream *s, double fallback) {
    double t = fallback;
    for (;;) {
        s->in = grow(s->in, &s->incap, s->inlen + 65536, 1);
        char cbuf[CMSG_SPACE(sizeof(struct timespec)) + 64];
        struct iovec iov = {s->in + s->inlen, s->incap - s->inlen};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
        ssize_t n = recvmsg(s->fd, &msg, MSG_DONTWAIT);
        if (n > 0) {
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
                    struct timespec ts;
                    memcpy(&ts, CMSG_DATA(c), sizeof ts);
                    t = (double)ts.tv_sec + ts.tv_nsec / 1e9 - real_minus_mono;
                }
            s->inlen += (size_t)n;
            if ((size_t)n < 65536) break;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (!s->close_code) s->close_code = 1006;
        stream_close(s);
        return;
    }
    walk(s, t);
    flush_out(s);
}

static void poll_sockets(void) {
    struct epoll_event events[256];
    int n;
    do {
        n = epoll_wait(sockets_ep, events, 256, 0);
        double t = now_s();
        for (int e = 0; e < n; e++) {
            uint64_t i = events[e].data.u64;
            if (i < nstreams && streams[i]->open) on_readable(streams[i], t);
        }
    } while (n == 256);
}

static void add_stream(int fd, const char *sid, int keep, const char *call, const char *account) {
    Stream *s = calloc(1, sizeof *s);
    s->fd = fd; s->open = 1; s->keep = keep; s->seq = 2;  /* `start` was sequence number 1 */
    snprintf(s->sid, sizeof s->sid, "%s", sid);
    snprintf(s->call, sizeof s->call, "%s", call);
    snprintf(s->account, sizeof s->account, "%s", account);
    s->sidlen = strlen(s->sid);
    streams = grow(streams, &capstreams, nstreams + 1, sizeof(Stream *));
    streams[nstreams] = s;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = nstreams};
    nstreams++;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one);
    if (epoll_ctl(sockets_ep, EPOLL_CTL_ADD, fd, &ev) < 0) { perror("epoll_ctl"); stream_close(s); }
}

static void put(FILE *f, const void *p, size_t n) {
    if (fwrite(p, 1, n, f) != n) { perror("write results"); exit(4); }
}

static void write_results(const char *path) {
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); exit(4); }
    uint32_t n = (uint32_t)nstreams;
    put(f, &n, 4);
    for (size_t i = 0; i < nstreams; i++) {
        Stream *s = streams[i];
        uint32_t sl = (uint32_t)s->sidlen;
        int64_t ints[4] = {s->bad, s->media, s->close_code, s->marks_echoed};
        uint64_t c;
        put(f, &sl, 4); put(f, s->sid, sl); put(f, ints, sizeof ints);
        c = s->nsent; put(f, &c, 8); put(f, s->sent, s->nsent * sizeof(double));
        c = s->nrecv; put(f, &c, 8); put(f, s->recv, s->nrecv * sizeof(Recv));
        c = s->alen; put(f, &c, 8); put(f, s->audio, s->alen);
    }
    if (fclose(f)) { perror(path); exit(4); }
}

static void load_payloads(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) { perror(path); exit(2); }
    char line[4096];
    size_t cap = 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (!line[0]) continue;
        payloads = grow(payloads, &cap, npayloads + 1, sizeof(char *));
        payloads[npayloads++] = strdup(line);
    }
    fclose(f);
    if (!npayloads) { fprintf(stderr, "%s: no payloads\n", path); exit(2); }
}

static void arm(int tfd, double at) {
    struct itimerspec its = {0};
    its.it_value.tv_sec = (time_t)at;
    its.it_value.tv_nsec = (long)((at - (double)(time_t)at) * 1e9);
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s CONTROL_FD PAYLOADS_FILE PHASES\n", argv[0]); return 2; }
    int ctl = atoi(argv[1]);
    int phases = atoi(argv[3]);
    if (phases < 1) phases = 1;
    load_payloads(argv[2]);
    epfd = epoll_create1(0);
    sockets_ep = epoll_create1(0);
    {
        struct timespec r, m;
        clock_gettime(CLOCK_REALTIME, &r);
        clock_gettime(CLOCK_MONOTONIC, &m);
        real_minus_mono = (double)r.tv_sec + r.tv_nsec / 1e9 - ((double)m.tv_sec + m.tv_nsec / 1e9);
    }
    int tfd = timerfd_create(CLOCK_MONOTONIC, 0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = CONTROL_TAG};
    epoll_ctl(epfd, EPOLL_CTL_ADD, ctl, &ev);
    ev.data.u64 = TIMER_TAG;
    epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, &ev);
    double step = FRAME_MS / 1000.0 / phases, start = now_s();
    uint64_t k = 0;
    int sending = 1, ending = 0;
    double end_deadline = 0;
    char out_path[4096] = "";
    arm(tfd, start);
    struct epoll_event events[256];
    for (;;) {
        int timeout = -1;
        if (ending) {
            size_t open = 0;
            for (size_t i = 0; i < nstreams; i++) open += streams[i]->open;
            double left = end_deadline - now_s();
            if (!open || left <= 0) break;
            timeout = (int)(left * 1000) + 1;
        }
        int n = epoll_wait(epfd, events, 256, timeout);
        if (n < 0 && errno != EINTR) { perror("epoll_wait"); return 3; }
        double t = now_s();
        for (int e = 0; e < n; e++) {
            uint64_t tag = events[e].data.u64;
            if (tag == TIMER_TAG) {
                uint64_t expirations;
                if (read(tfd, &expirations, 8) < 0) { /* spurious */ }
                double began = now_s();
                for (size_t i = k % phases; sending && i < nstreams; i += phases) {
                    Stream *s = streams[i];
                    if (s->open) send_media(s, began);
                }
                poll_sockets();  /* one pass over the sockets per tick, not one wake-up per message */
                for (size_t i = 0; i < nstreams; i++)
                    if (streams[i]->nmarks) due_marks(streams[i], now_s(), 0);
                k++;
                double next = start + k * step;
                if (next - now_s() < -0.2) { start = now_s(); k = 0; next = start; }  /* hopelessly behind: re-base */
                arm(tfd, next);
            } else if (tag == CONTROL_TAG) {
                char buf[512];
                char cbuf[CMSG_SPACE(sizeof(int))];
                struct iovec iov = {buf, sizeof buf - 1};
                struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
                ssize_t got = recvmsg(ctl, &msg, 0);
                if (got <= 0) { ending = 1; sending = 0; end_deadline = t; continue; }  /* parent gone */
                buf[got] = 0;
                int fd = -1;
                for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
                    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) memcpy(&fd, CMSG_DATA(c), sizeof fd);
                char sid[80], call[80], account[80];
                int keep = 0;
                if (sscanf(buf, "ADD %79s %d %79s %79s", sid, &keep, call, account) == 4 && fd >= 0)
                    add_stream(fd, sid, keep, call, account);
                else if (!strncmp(buf, "STOP", 4)) sending = 0;
                else if (!strncmp(buf, "END ", 4)) {
                    snprintf(out_path, sizeof out_path, "%s", buf + 4);
                    out_path[strcspn(out_path, "\r\n")] = 0;
                    sending = 0; ending = 1; end_deadline = t + 2.0;
                    for (size_t i = 0; i < nstreams; i++) {
                        Stream *s = streams[i];
                        char text[512];
                        int m = snprintf(text, sizeof text,
                                         "{\"event\":\"stop\",\"sequenceNumber\":\"%llu\",\"streamSid\":\"%s\","
                                         "\"stop\":{\"accountSid\":\"%s\",\"callSid\":\"%s\"}}",
                                         (unsigned long long)s->seq++, s->sid, s->account, s->call);
                        send_frame(s, 1, text, (size_t)m);
                        send_frame(s, 8, "\x03\xe8", 2);  /* close, 1000 */
                    }
                } else fprintf(stderr, "lean_media: bad control message %s\n", buf);
            }
        }
    }
    for (size_t i = 0; i < nstreams; i++) stream_close(streams[i]);
    if (!out_path[0]) return 1;
    write_results(out_path);
    return 0;
}
