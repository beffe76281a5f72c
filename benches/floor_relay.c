/*
 * The thinnest user-space TCP relay there is: one thread per direction,
 * blocking read(2) then write(2), TCP_NODELAY on both legs, no event loop,
 * no timers, no metrics. Not a product: a floor. Whatever it adds to a
 * direct connection at c=1 is what any user-space proxy must pay on this
 * machine for the two extra wake-ups and the extra TCP legs of a hop.
 *
 *   gcc -O2 -pthread -o floor_relay benches/floor_relay.c
 *   ./floor_relay 127.100.252.99 8080 127.0.0.1 18080
 *
 * benches/l4_ab.py builds and runs it beside the others (LOOPMESH_AB_FLOOR=1).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static struct sockaddr_in backend;

struct leg {
    int from, to;
    struct leg *other;
    int done; /* both directions finished: the second closes both fds */
    pthread_mutex_t *lock;
};

static void *pump(void *arg)
{
    struct leg *leg = arg;
    char buf[16384];
    for (;;) {
        ssize_t n = read(leg->from, buf, sizeof buf);
        if (n <= 0)
            break;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(leg->to, buf + off, n - off);
            if (w <= 0)
                goto out;
            off += w;
        }
    }
out:
    shutdown(leg->to, SHUT_WR);
    pthread_mutex_lock(leg->lock);
    int last = leg->other->done;
    leg->done = 1;
    pthread_mutex_unlock(leg->lock);
    if (last) {
        close(leg->from);
        close(leg->to);
        free(leg->lock);
        free(leg < leg->other ? leg : leg->other);
    }
    return NULL;
}

static void start(int client)
{
    int one = 1;
    int up = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(up, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (up < 0 || connect(up, (struct sockaddr *)&backend, sizeof backend) != 0) {
        close(client);
        if (up >= 0)
            close(up);
        return;
    }
    struct leg *legs = calloc(2, sizeof *legs);
    pthread_mutex_t *lock = malloc(sizeof *lock);
    pthread_mutex_init(lock, NULL);
    legs[0] = (struct leg){client, up, &legs[1], 0, lock};
    legs[1] = (struct leg){up, client, &legs[0], 0, lock};
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_t thread;
    pthread_create(&thread, &attr, pump, &legs[0]);
    pthread_create(&thread, &attr, pump, &legs[1]);
    pthread_attr_destroy(&attr);
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s listen-addr listen-port backend-addr backend-port\n", argv[0]);
        return 2;
    }
    struct sockaddr_in local = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    backend = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons(atoi(argv[4]))};
    if (inet_pton(AF_INET, argv[1], &local.sin_addr) != 1 || inet_pton(AF_INET, argv[3], &backend.sin_addr) != 1) {
        fprintf(stderr, "floor_relay: bad address\n");
        return 2;
    }
    int one = 1;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&local, sizeof local) != 0 || listen(listener, 4096) != 0) {
        perror("floor_relay: bind");
        return 1;
    }
    for (;;) {
        int client = accept(listener, NULL, NULL);
        if (client >= 0)
            start(client);
    }
}
