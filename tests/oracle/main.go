// Command vlg-oracle tells, for each request body of a corpus, what lk-jwt-service 0.5.0
// makes of it, using Go's own encoding/json. The differential test (tests/differential.rs)
// compares its answers with the filter's reader (token_request::parse_at).
//
// Input (a file named on the command line, or stdin): JSON lines
//
//	{"name": "...", "endpoint": "/sfu/get" | "/get_token", "body_b64": "<standard base64>"}
//
// Output (stdout): one JSON line per input line, in order:
//
//	{"ok": false, "error": "..."}
//	{"ok": true, "shape": "legacy" | "new", "room": ..., "slot": ..., "device": ...,
//	 "member_id": ..., "claimed_user": ..., "alias": ..., "identity": ...}
//
// The model, written from lk-jwt-service's documented request shapes and errors:
//
//   - The body is read whole; each decoding attempt runs json.NewDecoder over it with
//     DisallowUnknownFields() and one Decode into a fresh struct. Decode reads the first JSON
//     value only; whatever follows it is never looked at.
//   - /get_token decodes the new shape. /sfu/get decodes the legacy shape and, only when that
//     decoding returns an error, the new shape. A body that decodes as the legacy shape is
//     judged as legacy (it holds no new-shape key, so the new shape would miss room_id too).
//   - openid_token and member are struct values, not pointers: a JSON null leaves them as
//     they are (as it does every other field), a repeated object merges into them.
//   - expires_in and delay_timeout are int64, which is Go's int on the 64-bit platforms
//     lk-jwt-service ships for.
//   - Required, non-empty: legacy: room, openid_token.access_token,
//     openid_token.matrix_server_name, device_id; new: room_id, slot_id,
//     openid_token.access_token, openid_token.matrix_server_name, member.id,
//     member.claimed_user_id, member.claimed_device_id. Missing ones give 400 M_BAD_JSON.
//   - token_type, expires_in and the delay_* fields are optional, and only type-checked (no
//     rule ties the three delay_* fields together).
//   - slot is "m.call#ROOM" for the legacy shape. device is the legacy device_id or the new
//     member.claimed_device_id. alias = b64std_nopad(sha256(json.Marshal([room, slot]))).
//     For the new shape, identity = b64std_nopad(sha256(json.Marshal([claimed_user_id,
//     claimed_device_id, member.id]))), with claimed_user_id standing in for the user the
//     OpenID check verifies (the service issues a token only when they are equal).
//     The legacy identity (<verified user>:<device_id>) needs the OpenID answer: empty here.
package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime"
)

const legacySlot = "m.call#ROOM"

type OpenIDToken struct {
	AccessToken      string `json:"access_token"`
	TokenType        string `json:"token_type"`
	MatrixServerName string `json:"matrix_server_name"`
	ExpiresIn        int64  `json:"expires_in"`
}

type Member struct {
	ID              string `json:"id"`
	ClaimedUserID   string `json:"claimed_user_id"`
	ClaimedDeviceID string `json:"claimed_device_id"`
}

// LegacyRequest is the /sfu/get shape.
type LegacyRequest struct {
	Room          string      `json:"room"`
	OpenIDToken   OpenIDToken `json:"openid_token"`
	DeviceID      string      `json:"device_id"`
	DelayID       string      `json:"delay_id"`
	DelayTimeout  int64       `json:"delay_timeout"`
	DelayCSAPIURL string      `json:"delay_cs_api_url"`
}

// NewRequest is the /get_token shape (also taken by /sfu/get up to 0.5.0).
type NewRequest struct {
	RoomID        string      `json:"room_id"`
	SlotID        string      `json:"slot_id"`
	OpenIDToken   OpenIDToken `json:"openid_token"`
	Member        Member      `json:"member"`
	DelayID       string      `json:"delay_id"`
	DelayTimeout  int64       `json:"delay_timeout"`
	DelayCSAPIURL string      `json:"delay_cs_api_url"`
}

type corpusEntry struct {
	Name     string `json:"name"`
	Endpoint string `json:"endpoint"`
	Body     []byte `json:"body_b64"` // encoding/json reads []byte as standard base64
}

type outcome struct {
	OK          bool   `json:"ok"`
	Error       string `json:"error,omitempty"`
	Shape       string `json:"shape,omitempty"`
	Room        string `json:"room,omitempty"`
	Slot        string `json:"slot,omitempty"`
	Device      string `json:"device,omitempty"`
	MemberID    string `json:"member_id,omitempty"`
	ClaimedUser string `json:"claimed_user,omitempty"`
	Alias       string `json:"alias,omitempty"`
	Identity    string `json:"identity,omitempty"`
}

func decode(body []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

// hashOfStrings is b64std_nopad(sha256(json.Marshal(items))).
func hashOfStrings(items ...string) string {
	marshalled, err := json.Marshal(items)
	if err != nil {
		panic(err) // a []string always marshals
	}
	sum := sha256.Sum256(marshalled)
	return base64.RawStdEncoding.EncodeToString(sum[:])
}

// keyFolding tells which case folding this Go release applies to keys: Unicode simple
// folding (Go up to 1.20, and current releases) leaves U+0130 'İ' apart from 'I'; the
// ToUpper(ToLower(r)) folding of some releases in between does not.
func keyFolding() string {
	var probe struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal([]byte(`{"\u0130d":"x"}`), &probe); err == nil && probe.ID == "x" {
		return "key folding: ToUpper(ToLower(r)), İ matches i (the filter follows simple folding: expect mismatches)"
	}
	return "key folding: Unicode simple folding"
}

// checkVectors compares the hashes with the test vectors lk-jwt-service documents.
func checkVectors() error {
	for _, v := range []struct {
		items []string
		want  string
	}{
		{[]string{"!roomid:example.com", "slot1234"}, "O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc"},
		{[]string{"@alice:example.com", "DEVICE123", "memberABC"}, "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"},
	} {
		if got := hashOfStrings(v.items...); got != v.want {
			return fmt.Errorf("hash of %q is %s, want %s", v.items, got, v.want)
		}
	}
	return nil
}

func refused(format string, args ...any) outcome {
	return outcome{OK: false, Error: fmt.Sprintf(format, args...)}
}

func judgeLegacy(r *LegacyRequest) outcome {
	if r.Room == "" {
		return refused("M_BAD_JSON: missing room")
	}
	if r.OpenIDToken.AccessToken == "" || r.OpenIDToken.MatrixServerName == "" {
		return refused("M_BAD_JSON: missing OpenID token parameters")
	}
	if r.DeviceID == "" {
		return refused("M_BAD_JSON: missing device_id")
	}
	return outcome{
		OK:     true,
		Shape:  "legacy",
		Room:   r.Room,
		Slot:   legacySlot,
		Device: r.DeviceID,
		Alias:  hashOfStrings(r.Room, legacySlot),
	}
}

func judgeNew(r *NewRequest) outcome {
	if r.RoomID == "" || r.SlotID == "" {
		return refused("M_BAD_JSON: missing room_id or slot_id")
	}
	if r.OpenIDToken.AccessToken == "" || r.OpenIDToken.MatrixServerName == "" {
		return refused("M_BAD_JSON: missing OpenID token parameters")
	}
	m := r.Member
	if m.ID == "" || m.ClaimedUserID == "" || m.ClaimedDeviceID == "" {
		return refused("M_BAD_JSON: member is missing id, claimed_user_id or claimed_device_id")
	}
	return outcome{
		OK:          true,
		Shape:       "new",
		Room:        r.RoomID,
		Slot:        r.SlotID,
		Device:      m.ClaimedDeviceID,
		MemberID:    m.ID,
		ClaimedUser: m.ClaimedUserID,
		Alias:       hashOfStrings(r.RoomID, r.SlotID),
		Identity:    hashOfStrings(m.ClaimedUserID, m.ClaimedDeviceID, m.ID),
	}
}

func judge(endpoint string, body []byte) outcome {
	switch endpoint {
	case "/get_token":
		var r NewRequest
		if err := decode(body, &r); err != nil {
			return refused("M_NOT_JSON: %v", err)
		}
		return judgeNew(&r)
	case "/sfu/get":
		var legacy LegacyRequest
		legacyErr := decode(body, &legacy)
		if legacyErr == nil {
			return judgeLegacy(&legacy)
		}
		var r NewRequest
		if err := decode(body, &r); err != nil {
			return refused("M_NOT_JSON: legacy: %v; new: %v", legacyErr, err)
		}
		return judgeNew(&r)
	default:
		return refused("unknown endpoint %q", endpoint)
	}
}

func main() {
	var input io.Reader = os.Stdin
	switch len(os.Args) {
	case 1:
	case 2:
		f, err := os.Open(os.Args[1])
		if err != nil {
			fmt.Fprintln(os.Stderr, "vlg-oracle:", err)
			os.Exit(2)
		}
		defer f.Close()
		input = f
	default:
		fmt.Fprintln(os.Stderr, "usage: vlg-oracle [corpus.jsonl]")
		os.Exit(2)
	}
	fmt.Fprintf(os.Stderr, "vlg-oracle: %s, %s, %s\n", runtime.Version(), jsonImplementation, keyFolding())
	if err := checkVectors(); err != nil {
		fmt.Fprintln(os.Stderr, "vlg-oracle:", err)
		os.Exit(2)
	}

	corpus := json.NewDecoder(bufio.NewReaderSize(input, 1<<20))
	out := bufio.NewWriterSize(os.Stdout, 1<<20)
	defer out.Flush()
	for line := 1; ; line++ {
		var entry corpusEntry
		err := corpus.Decode(&entry)
		if err == io.EOF {
			break
		}
		if err != nil {
			out.Flush()
			fmt.Fprintf(os.Stderr, "vlg-oracle: corpus entry %d: %v\n", line, err)
			os.Exit(2)
		}
		answer, err := json.Marshal(judge(entry.Endpoint, entry.Body))
		if err != nil {
			panic(err)
		}
		out.Write(answer)
		out.WriteByte('\n')
	}
}
