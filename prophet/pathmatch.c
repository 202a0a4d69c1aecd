/* Batch-1 path matching (prophet/predict/pathmatch.py) in one call per layer, for ctypes.

   The state stays in the predictor's numpy arrays; every call gets their addresses and sizes in one int64
   parameter block P and its floats in F (set once per memory change, so a call converts a few arguments;
   small ones are C ints, as ctypes passes Python ints without argtypes):

   P[0] mem    float32 [L, E+1, cap]: rows 0..E-1 use indicators, row E 1 where the entry may vote
   P[1] L      P[2] E      P[3] cap
   P[4] m      memory rows in use (the similarity vector's length)
   P[5] sim    float32 [m] similarity of the current token to each row
   P[6] succ   int64 [cap] next token of the same sequence, -1 if none
   P[7] pred   int64 [cap] previous token of the same sequence, -1 if none
   P[8] top    int64 [n] the current neighbours          P[9] w  float32 [n] their vote weights
   P[10] n     neighbours wanted                          P[11] found: neighbours kept (written by observe)
   P[12] prior_votes float64 [L, E]                       P[13] out float64 [D, E] scores
   P[14] ids   int64 [k] this layer's experts (when k > 2) P[15] unused
   P[16] tok   float32 [L, E+1] the current token's column: its experts per observed layer, and 1 in row E
   P[17] uses  float64 [L, E]  P[18] steps float64 [L]  P[19] freq float64 [L, E]: the layers' use frequencies
   F[0] decay  F[1] power  F[2] prior  F[3] carry

   Arithmetic is the numpy reference's, in float32 where it is float32 (`-ffp-contract=off`: no fused
   multiply-adds), so similarities are bit-identical; vote sums differ from numpy's BLAS order only in the
   last float32 bits. Neighbours are the n largest (similarity, row) pairs: ties at the cut go to the latest
   rows, the rule `prophet.predict.pathmatch.nearest` states for the numpy paths. */

#include <math.h>

typedef long i64;

enum { MEM, NL, NE, CAP, M, SIM, SUCC, PRED, TOP, W, N, FOUND, PRIOR_VOTES, OUT, IDS, DIST, TOK, USES, STEPS, FREQ,
       ROWIDS, K1 };

/* The neighbour set in slot order is kept as a small min-heap on (sim, row): the root is the worst kept. */
static int worse(float a, i64 ra, float b, i64 rb) { return a < b || (a == b && ra < rb); }

static void sift_down(float *v, i64 *r, i64 n, i64 i) {
    for (;;) {
        i64 c = 2 * i + 1;
        if (c >= n) return;
        if (c + 1 < n && worse(v[c + 1], r[c + 1], v[c], r[c])) c++;
        if (!worse(v[c], r[c], v[i], r[i])) return;
        float tv = v[i]; v[i] = v[c]; v[c] = tv;
        i64 tr = r[i]; r[i] = r[c]; r[c] = tr;
        i = c;
    }
}

/* The largest of BLOCK similarities, in 8 lanes the compiler vectorizes (the pick skips most blocks whole, as
   the cut soon exceeds them, instead of comparing row by row). */
#define BLOCK 64
static float block_max(const float *x) {
    float lane[8];
    for (int j = 0; j < 8; j++) lane[j] = x[j];
    for (int i = 8; i < BLOCK; i += 8)
        for (int j = 0; j < 8; j++) lane[j] = lane[j] > x[i + j] ? lane[j] : x[i + j];
    float best = lane[0];
    for (int j = 1; j < 8; j++) best = best > lane[j] ? best : lane[j];
    return best;
}

/* sim = sim * decay + (sum of this layer's k expert rows), the layer recorded in the token's column; then
   the n nearest rows and their weights. The k ids are a, b when k <= 2, else P[IDS]. layer < 0: only pick
   the neighbours of sim as it is. Returns 1, changing nothing, when an id is not an expert (0..E-1). */
int prophet_pm_observe(i64 *P, const double *F, int layer, int k, int a_id, int b_id) {
    const i64 E = P[NE], cap = P[CAP], m = P[M];
    const float *col = (const float *)P[MEM] + (layer < 0 ? 0 : layer) * (E + 1) * cap;
    const i64 pair[2] = {a_id, b_id};
    const i64 *ids = k <= 2 ? pair : (const i64 *)P[IDS];
    for (int j = 0; j < k; j++)
        if (ids[j] < 0 || ids[j] >= E) return 1;
    if (layer >= 0) {
        float *tok = (float *)P[TOK] + layer * (E + 1);
        for (i64 e = 0; e < E; e++) tok[e] = 0.0f;
        for (int j = 0; j < k; j++) tok[ids[j]] = 1.0f;
        tok[E] = 1.0f;
    }
    float *sim = (float *)P[SIM];
    const float decay = (float)F[0];
    const float *a = k > 0 ? col + ids[0] * cap : 0, *b = k > 1 ? col + ids[1] * cap : 0;
    if (layer < 0) {
        /* pick the neighbours of the similarities as they are */
    } else if (k == 0) {
        for (i64 i = 0; i < m; i++) sim[i] = sim[i] * decay;
    } else if (k == 1) {
        for (i64 i = 0; i < m; i++) sim[i] = sim[i] * decay + a[i];
    } else if (k == 2) {
        for (i64 i = 0; i < m; i++) sim[i] = sim[i] * decay + (a[i] + b[i]);
    } else {
        for (i64 i = 0; i < m; i++) {
            float s = 0.0f;  /* 0/1 terms: exact in any order */
            for (i64 j = 0; j < k; j++) s += col[ids[j] * cap + i];
            sim[i] = sim[i] * decay + s;
        }
    }
    i64 n = P[N] < m ? P[N] : m;
    i64 *top = (i64 *)P[TOP];
    float *w = (float *)P[W];
    float heap[256];
    if (n > 256) n = 256;  /* the Python side keeps neighbours <= 256 for this kernel */
    for (i64 i = 0; i < n; i++) { heap[i] = sim[i]; top[i] = i; }
    for (i64 i = n / 2 - 1; i >= 0; i--) sift_down(heap, top, n, i);
    if (n > 0) {
        float cut = heap[0];
        for (i64 i0 = n; i0 < m; i0 += BLOCK) {
            const i64 i1 = i0 + BLOCK < m ? i0 + BLOCK : m;
            if (i1 - i0 == BLOCK && block_max(sim + i0) < cut) continue;  /* nothing here makes the cut */
            for (i64 i = i0; i < i1; i++) {
                if (sim[i] >= cut) {  /* a later row wins a tie: (sim, row) is larger */
                    heap[0] = sim[i]; top[0] = i;
                    sift_down(heap, top, n, 0);
                    cut = heap[0];
                }
            }
        }
    }
    const float power = (float)F[1];
    for (i64 i = 0; i < n; i++) w[i] = F[1] == 2.0 ? heap[i] * heap[i] : powf(heap[i], power);
    P[FOUND] = n;
    return 0;
}

/* out[d, e] = (votes + prior_votes[j, e]) / (total + prior) for distances dist [D]: the neighbours' rows
   `shift` tokens later (following succ) vote at layer j, with shift, j = divmod(layer + d, L). */
void prophet_pm_scores(const i64 *P, const double *F, int layer, int D, const i64 *dist) {
    const i64 L = P[NL], E = P[NE], cap = P[CAP], n = P[FOUND];
    const float *mem = (const float *)P[MEM];
    const i64 *succ = (const i64 *)P[SUCC], *top = (const i64 *)P[TOP];
    const float *w = (const float *)P[W];
    const double *prior_votes = (const double *)P[PRIOR_VOTES];
    double *out = (double *)P[OUT];
    const float prior = (float)F[2];
    const short *rowids = (const short *)P[ROWIDS];
    const i64 k1 = P[K1];
    float votes[1025];
    i64 rows[256];
    for (int d = 0; d < D; d++) {
        const i64 shift = (layer + dist[d]) / L, j = (layer + dist[d]) % L;
        for (i64 i = 0; i < n; i++) {
            i64 r = top[i];
            for (i64 s = 0; s < shift && r >= 0; s++) r = succ[r];
            rows[i] = r;
        }
        if (rowids) {  /* the same adds in the same neighbour order, less the zeros: bit for bit the dense sums */
            const short *tab = rowids + j * cap * k1;
            for (i64 e = 0; e <= E; e++) votes[e] = 0.0f;
            for (i64 i = 0; i < n; i++) {
                if (rows[i] < 0) continue;
                const short *ids = tab + rows[i] * k1;
                for (i64 q = 0; q < k1 && ids[q] >= 0; q++) votes[ids[q]] += w[i];
            }
        } else {
            const float *col = mem + j * (E + 1) * cap;
            for (i64 e = 0; e <= E; e++) {
                const float *row = col + e * cap;
                float v = 0.0f;
                for (i64 i = 0; i < n; i++)
                    if (rows[i] >= 0) v += row[rows[i]] * w[i];
                votes[e] = v;
            }
        }
        const float total = votes[E] + prior;
        for (i64 e = 0; e < E; e++) out[d * E + e] = ((double)votes[e] + prior_votes[j * E + e]) / (double)total;
    }
}

/* A new token: new_sim[i] = carry * old_sim[pred[i]] where row i's predecessor was scored, else 0. */
void prophet_pm_carry(const i64 *P, const double *F, const float *old, int old_m) {
    const i64 m = P[M];
    const i64 *pred = (const i64 *)P[PRED];
    float *sim = (float *)P[SIM];
    const float carry = (float)F[3];
    for (i64 i = 0; i < m; i++) {
        const i64 p = pred[i];
        sim[i] = (p >= 0 && p < old_m) ? carry * old[p] : 0.0f;
    }
}

/* Store the finished token's column as memory row m (the caller made room): its uses, the link from the
   previous token of the sequence (last >= 0), and the layers' frequencies and prior votes recomputed as
   `PathMatchReference._append` computes them, and its sparse ids (P[ROWIDS]) where kept; the column is cleared
   for the next token. Returns 1 when a layer has more than K1 entries or one not 0/1 (the sparse view is then
   incomplete: the caller turns it off). */
int prophet_pm_store(const i64 *P, const double *F, int last) {
    const i64 L = P[NL], E = P[NE], cap = P[CAP], a = P[M];
    float *mem = (float *)P[MEM], *tok = (float *)P[TOK];
    double *uses = (double *)P[USES], *steps = (double *)P[STEPS], *freq = (double *)P[FREQ];
    double *prior_votes = (double *)P[PRIOR_VOTES];
    short *rowids = (short *)P[ROWIDS];
    const i64 k1 = P[K1];
    int lost = 0;
    for (i64 l = 0; l < L; l++) {
        float *t = tok + l * (E + 1);
        for (i64 e = 0; e <= E; e++) mem[(l * (E + 1) + e) * cap + a] = t[e];
        if (rowids) {
            short *ids = rowids + (l * cap + a) * k1;
            i64 q = 0;
            for (i64 e = 0; e <= E; e++) {
                if (t[e] == 0.0f) continue;
                if (t[e] != 1.0f || q == k1) lost = 1;
                else ids[q++] = (short)e;
            }
            for (; q < k1; q++) ids[q] = -1;
        }
        for (i64 e = 0; e < E; e++) uses[l * E + e] += t[e];
        steps[l] += t[E];
        for (i64 e = 0; e < E; e++) {
            freq[l * E + e] = uses[l * E + e] / steps[l];
            prior_votes[l * E + e] = F[2] * freq[l * E + e];
        }
        for (i64 e = 0; e <= E; e++) t[e] = 0.0f;
    }
    if (last >= 0) {
        ((i64 *)P[SUCC])[last] = a;
        ((i64 *)P[PRED])[a] = last;
    }
    return lost;
}
